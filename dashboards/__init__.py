"""Streamlit feature browser: reads storage read-only, calls pipeline for live work."""
