"""The /trace page as one package: ``page`` (the page itself), ``layout`` (the graph file read and placed on a grid),
``chart`` (the Altair chart), ``intervene`` (ablate or clamp nodes), ``new`` (trace a new prompt).

``render`` is the page's entry point, as every module of ``dashboards.views`` has one.
"""

from dashboards.views.trace.page import render

__all__ = ["render"]
