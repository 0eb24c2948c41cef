"""CLI verbs and their configs: wire ``pipeline`` to ``storage``; no math here."""
