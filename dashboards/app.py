"""saescope's feature browser: navigation only; each page lives in dashboards/views/."""

import streamlit as st

from dashboards.views import compare, feature, features, overview, probe, steer, trace

st.set_page_config(page_title="saescope", page_icon="🔬", layout="wide")
st.navigation(
    [
        st.Page(overview.render, title="Overview", url_path="overview", default=True),
        st.Page(features.render, title="Features", url_path="features"),
        st.Page(feature.render, title="Feature", url_path="feature"),
        st.Page(probe.render, title="Text probe", url_path="probe"),
        st.Page(steer.render, title="Steering", url_path="steer"),
        st.Page(compare.render, title="Compare", url_path="compare"),
        st.Page(trace.render, title="Trace", url_path="trace"),
    ]
).run()
