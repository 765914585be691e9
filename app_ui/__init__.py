"""The Streamlit side of the app: state, sources, scoring, figures, widgets.

The pages in ``pages/`` stay thin scripts; everything two pages share lives
here. Nothing in ``padim_core`` imports this package.
"""
