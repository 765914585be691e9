"""PaDiM visual inspection: the app's entry point. It only routes.

Run with ``streamlit run app.py`` (or ``make run``).
"""

import streamlit as st

from app_ui import shell
from app_ui.widgets import (
    BATCH_PAGE,
    FIT_PAGE,
    INSPECT_PAGE,
    MODELS_PAGE,
    THRESHOLDS_PAGE,
)

st.set_page_config(
    page_title="PaDiM inspection", page_icon=":material/search:", layout="wide"
)

# Fit is the default page, served at the root URL; the others keep their own
# addresses (/inspect, /thresholds, ...) so they can be bookmarked.
page = st.navigation(
    [
        st.Page(FIT_PAGE, title="Fit", icon=":material/model_training:", default=True),
        st.Page(INSPECT_PAGE, title="Inspect", icon=":material/search:"),
        st.Page(THRESHOLDS_PAGE, title="Thresholds", icon=":material/tune:"),
        st.Page(BATCH_PAGE, title="Batch", icon=":material/table_view:"),
        st.Page(MODELS_PAGE, title="Models", icon=":material/inventory_2:"),
    ]
)
shell.sidebar()
shell.run_page(page)
