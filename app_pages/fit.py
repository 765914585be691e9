"""Fit page: fit PaDiM on images of good parts, or add good images to a model."""

from dataclasses import replace
from datetime import date
from pathlib import PurePosixPath

import pandas as pd
import streamlit as st
from streamlit.delta_generator import DeltaGenerator

from app_ui import state
from app_ui.fitting import (
    FitJob,
    FitRequest,
    ReviewOutcome,
    get_job,
    names_in_use,
    running_jobs,
    split_holdout,
    start_fit,
)
from app_ui.sources import Item, is_demo, pick_images
from app_ui.state import PERSIST
from app_ui.widgets import (
    INSPECT_PAGE,
    duration,
    escape_markdown,
    raw,
    report_skipped,
    show_flash,
    show_warnings,
    time_left_text,
)
from padim_core import demo, workspace
from padim_core.backbones import BACKBONES
from padim_core.model import make_config
from padim_core.review import MIN_REVIEW_IMAGES, MODIFIED_Z_CUTOFF
from padim_core.workspace import ModelEntry

NEW = "New model"
EXTEND = "Add images to a model"
IMAGE_SIZES = (128, 160, 192, 224, 256, 320, 384, 448, 512)
DEFAULT_IMAGE_SIZE = 256
DEFAULT_BACKBONE = "efficientnet_lite0"
NAME_KEY = "fit_name"
# The model name last offered by default; while the field still holds it, the
# field follows the images chosen.
OFFERED_NAME_KEY = "fit_name_offered"
DEMO_MODEL_NAME = "solar-cells"
REVIEW_LABEL = "Check the training images for outliers (one more pass over them)"
# Thumbnails of flagged training images per row.
REVIEW_COLUMNS = 4


def fit_page() -> None:
    """Choose good images and settings, fit in the background, save the model."""
    st.title("Fit")
    st.caption(
        "PaDiM learns what good parts look like from images of good parts only. "
        "The model is saved in the workspace as soon as the fit ends."
    )
    show_flash()
    job = get_job(st.session_state.get(state.FIT_JOB))
    refit = refusal = None
    if job is not None and job.running:
        _progress(job.id)
    elif job is not None:
        refit, refusal = _outcome(job)
    else:
        _ready_note()
    _others_running(job)

    root = state.workspace_root()
    entries = [entry for entry in workspace.list_models(root) if entry.error is None]
    mode = NEW
    if entries:
        mode = st.segmented_control(
            "Task",
            [NEW, EXTEND],
            default=NEW,
            key="fit_mode",
            required=True,
            persist_state=PERSIST,
        )
    items, skipped = pick_images(
        "fit",
        f"{demo.N_TRAIN} good monocrystalline solar cells (elpv-dataset)",
        demo.train_images,
        "Images of good parts",
    )
    report_skipped(skipped)
    busy = job is not None and job.running
    if mode == EXTEND:
        request = _extend_form(items, entries, root, busy)
    else:
        request = _new_form(items, root, busy)
    if refit is not None:
        request = _refit_request(refit, items, root, refusal)
    if request is not None:
        request.source = "demo" if is_demo(items) else "upload"
        try:
            st.session_state[state.FIT_JOB] = start_fit(request).id
        except ValueError as error:
            st.error(escape_markdown(error))
            return
        st.session_state.pop(NAME_KEY, None)
        st.rerun()


@st.fragment(run_every=1.0)
def _progress(job_id: int) -> None:
    job = get_job(job_id)
    if job is None or not job.running:
        st.rerun()
    label = f"{job.phase} ({escape_markdown(job.request.name)})"
    text = time_left_text(label, job.done, job.total, job.elapsed, job.step, job.unit)
    st.progress(min(job.done / max(job.total, 1), 1.0), text=text)
    note, stop = st.columns([4, 1], vertical_alignment="center")
    note.caption(
        "You can use the other pages meanwhile; the model appears in the "
        "workspace when the fit ends."
    )
    if stop.button("Cancel", icon=":material/stop:", key="fit_cancel"):
        job.cancelled = True


def _outcome(job: FitJob) -> tuple[FitJob | None, DeltaGenerator | None]:
    """Say how the fit ended.

    Returns:
        The job when asked to fit it again without the flagged images, and
        the place beside that button for the reason it cannot be done.
    """
    name = escape_markdown(repr(job.request.name))
    if job.cancelled and job.path is None:
        st.info(f"The fit of {name} was cancelled; nothing was saved.")
    elif job.error is not None:
        st.error(
            f"The fit of {name} failed: {escape_markdown(job.error)}. Nothing was "
            "saved."
        )
    elif job.request.extend is not None:
        st.success(
            f"Added {job.n_images:,} images to **{escape_markdown(job.path.stem)}** "
            f"in {duration(job.elapsed)}. It is now the active model."
        )
    else:
        st.success(
            f"Model **{escape_markdown(job.path.stem)}** saved: {job.n_images:,} "
            f"images in {duration(job.elapsed)}. It is now the active model."
        )
        if job.held_out:
            were = "image was" if job.held_out == 1 else "images were"
            source = (
                "its score"
                if job.held_out == 1
                else "the 99th percentile of their scores"
            )
            st.info(
                f"{job.held_out} good {were} held out of the fit; {source} is the "
                "first image threshold. Tune it on the Thresholds page with good and "
                "defective images."
            )
    if job.error is None:
        for note in job.notes:
            st.info(escape_markdown(note))
    show_warnings(job.warnings)
    refit = refusal = None
    if job.error is None and job.review is not None:
        clicked, refusal = _review_outcome(job.review, job.path.stem)
        refit = job if clicked else None
    if job.error is None:
        st.page_link(INSPECT_PAGE, label="Inspect images", icon=":material/search:")
    report_skipped(job.skipped)
    return refit, refusal


def _review_outcome(
    review: ReviewOutcome, model: str
) -> tuple[bool, DeltaGenerator | None]:
    """Show what the check found.

    Returns:
        Whether a fit without the flagged images is asked, and the place
        beside that button for a refusal (None without the button).
    """
    if review.note is not None:  # among the fit's warnings already
        return False, None
    checked = _checked_words(review)
    if not review.flagged:
        st.success(
            f"None of the {checked} looks unlike the rest: each was scored by a "
            "model fitted without it, and none scored far above the others."
        )
        _review_download(review, model)
        return False, None
    count = len(review.flagged)
    look, these, show = (
        ("looks", "it", "shows") if count == 1 else ("look", "these", "show")
    )
    st.warning(
        f"{count} of {checked} {look} unlike the rest. Each image was scored by a "
        "model fitted on half of the training images, not including it; "
        f"{these} scored above {review.cutoff:.1f} (modified z-score above "
        f"{MODIFIED_Z_CUTOFF}). Check whether {these} really {show} good parts."
    )
    held = sum(row.held_out for row in review.flagged)
    if held:
        them = "it" if held == 1 else "them"
        st.warning(
            f"{_count(held, 'flagged image was', 'flagged images were')} held out "
            f"of the fit, so the first threshold was set with {them}. Fit again "
            f"without {them}, or set the threshold on the Thresholds page."
        )
    _flagged_pictures(review)
    _flagged_table(review)
    _review_download(review, model)
    clicked = st.button(
        _refit_label(count), icon=":material/refresh:", key="fit_again_without"
    )
    return clicked, st.empty()


def _count(n: int, one: str, many: str) -> str:
    """``1 image was`` or ``3 images were``."""
    return f"{n:,} {one if n == 1 else many}"


def _checked_words(review: ReviewOutcome) -> str:
    """``12 images checked (10 fitted, 2 held out)``, or ``10 training images``."""
    if not review.held_out:
        return f"{review.reviewed:,} training images"
    fitted = review.reviewed - review.held_out
    return (
        f"{review.reviewed:,} images checked ({fitted:,} fitted, "
        f"{review.held_out:,} held out)"
    )


def _flagged_pictures(review: ReviewOutcome) -> None:
    columns = st.columns(REVIEW_COLUMNS)
    for i, row in enumerate(review.flagged):
        picture = review.pictures.get(row.path)
        if picture is not None:
            held = " · held out" if row.held_out else ""
            columns[i % REVIEW_COLUMNS].image(
                picture,
                caption=f"{escape_markdown(row.path)} · score {row.score:.1f} · "
                f"z {row.modified_z:.1f}{held}",
            )


def _flagged_table(review: ReviewOutcome) -> None:
    st.dataframe(
        pd.DataFrame(
            {
                "image": [row.path for row in review.flagged],
                "out-of-fold score": [row.score for row in review.flagged],
                "modified z": [row.modified_z for row in review.flagged],
                "held out": [row.held_out for row in review.flagged],
            }
        ),
        hide_index=True,
        column_config={
            "out-of-fold score": st.column_config.NumberColumn(format="%.1f"),
            "modified z": st.column_config.NumberColumn(format="%.1f"),
        },
    )


def _review_download(review: ReviewOutcome, model: str) -> None:
    """Offer every checked image's result as CSV, the highest score first."""
    st.download_button(
        "Download the check as CSV",
        review.csv,
        file_name=f"{model}-check.csv",
        mime="text/csv",
        icon=":material/download:",
        key="fit_review_csv",
    )


def _refit_label(count: int) -> str:
    """The label of the button that fits again without ``count`` images."""
    if count == 1:
        return "Fit again without this image"
    return f"Fit again without these {count} images"


def _refit_request(
    job: FitJob, items: list[Item], root, refusal: DeltaGenerator
) -> FitRequest | None:
    """A new fit like ``job``'s, on the images chosen minus the flagged ones.

    Flagged held-out images are left out too: the new fit holds out others.
    A refusal is shown in ``refusal``, beside the button that asked.
    """
    flagged = {row.path for row in job.review.flagged}
    kept = [item for item in items if item.name not in flagged]
    if {item.name for item in items} != job.names:
        refusal.error(
            "The images chosen below are no longer those of that fit, so the flagged "
            "ones cannot be left out of them. Choose the same images again, or fit "
            "without the flagged files by hand."
        )
        return None
    base = workspace.safe_name(f"{job.path.stem}-without-outliers")
    return replace(
        job.request,
        items=kept,
        name=workspace.unique_name(base, root, names_in_use(root)),
        root=root,
        device=state.device(),
    )


def _ready_note() -> None:
    active = state.active_model()
    if active is None or active.error is not None:
        return
    note, link = st.columns([3, 1], vertical_alignment="center")
    note.caption(
        f"The active model **{escape_markdown(active.name)}** is ready. Fit a new "
        "one below, or add good images to a model."
    )
    link.page_link(INSPECT_PAGE, label="Inspect images", icon=":material/search:")


def _others_running(own: FitJob | None) -> None:
    for job in running_jobs():
        if own is None or job.id != own.id:
            done, total = job.step or (job.done, job.total)
            st.info(
                f"A fit of {escape_markdown(repr(job.request.name))} started earlier "
                f"is running ({job.phase.lower()}: {done:,} of {total:,} {job.unit}); "
                "its model appears in the workspace when it ends."
            )


def _backbone_label(name: str) -> str:
    return name + ("" if name != DEFAULT_BACKBONE else " (default)")


def _layer_label(spec, layer: str) -> str:
    """``layer1 · stride 4 · 64 ch``; short, so that three tags fit the box."""
    stride, channels = spec.layers[layer]
    if layer == f"stride{stride}":  # the name already says it
        return f"{layer} · {channels} ch"
    return f"{layer} · stride {stride} · {channels} ch"


def _new_form(items: list[Item], root, busy: bool) -> FitRequest | None:
    """Settings of a new model; returns a request when the user starts it."""
    # Backbone and layers get a row of their own: their labels are long.
    first, second = st.columns([2, 3])
    names = list(BACKBONES)
    backbone = first.selectbox(
        "Backbone",
        names,
        index=names.index(DEFAULT_BACKBONE),
        key="fit_backbone",
        persist_state=PERSIST,
        format_func=_backbone_label,
    )
    spec = BACKBONES[backbone]
    first.caption(f"Weights: {spec.weights_source}")
    layers = second.multiselect(
        "Layers",
        list(spec.layers),
        default=list(spec.default_layers),
        key=f"fit_layers_{backbone}",
        persist_state=PERSIST,
        format_func=lambda layer: _layer_label(spec, layer),
    )
    available = spec.channels(layers) if layers else 1
    left, middle, right = st.columns(3)
    n_features = left.number_input(
        "Random channels kept (n_features)",
        1,
        available,
        min(spec.default_n_features, available),
        key=f"fit_nf_{backbone}_{layers}",
        persist_state=PERSIST,
        help=f"1 to {available} for these layers; more is slower and larger.",
    )
    image_size = middle.selectbox(
        "Image size",
        IMAGE_SIZES,
        index=IMAGE_SIZES.index(DEFAULT_IMAGE_SIZE),
        format_func=lambda side: f"{side} × {side} px",
        key="fit_image_size",
        persist_state=PERSIST,
    )
    with right:
        name = _name_field(items, root)
    seed, batch_size, hold_out, pre_trained = _more_settings(backbone)
    review = st.checkbox(
        REVIEW_LABEL,
        False,
        key="fit_review",
        persist_state=PERSIST,
        help="Scores each training image with a model fitted on the other half of "
        "them and lists those that score far above the rest: worn or defective "
        f"parts filed as good. Needs at least {MIN_REVIEW_IMAGES} images; the "
        "model itself is the same as without the check.",
    )
    config = {
        "backbone": backbone,
        "layers": tuple(layers),
        "n_features": int(n_features),
        "image_size": int(image_size),
        "seed": int(seed),
        "pre_trained": pre_trained,
    }
    ready = _check_weights(config) and bool(layers)
    _estimate(items, config, hold_out)
    clicked = st.button(
        "Fit model",
        type="primary",
        icon=":material/play_arrow:",
        disabled=busy or not items or not ready,
    )
    if not clicked:
        return None
    return _new_request(items, root, name, config, batch_size, hold_out, review)


def _more_settings(backbone: str) -> tuple[int, int, bool, bool]:
    with st.expander("More settings"):
        left, right = st.columns(2)
        seed = left.number_input(
            "Seed of the channel subset",
            0,
            2**31 - 1,
            0,
            key="fit_seed",
            persist_state=PERSIST,
        )
        batch_size = right.number_input(
            "Batch size", 1, 256, 16, key="fit_batch", persist_state=PERSIST
        )
        hold_out = left.toggle(
            "Hold out 10 % of the images to set a first threshold",
            True,
            key="fit_hold_out",
            persist_state=PERSIST,
            help="Needs at least 5 images; the held-out images are not fitted on.",
        )
        pre_trained = right.toggle(
            "ImageNet weights",
            True,
            key=f"fit_pre_{backbone}",
            persist_state=PERSIST,
            help="Off: random weights (a weaker baseline).",
        )
    return seed, batch_size, hold_out, pre_trained


def _check_weights(config: dict) -> bool:
    """Warn when the backbone's weights are missing; offer random weights."""
    problem = workspace.weights_missing(make_config(**config))
    if problem is None:
        return True
    st.warning(
        f"{escape_markdown(problem[0].upper() + problem[1:])}. Under *More "
        "settings*, turn off *ImageNet weights* to fit with random weights instead."
    )
    return False


def _estimate(items: list[Item], config: dict, hold_out: bool) -> None:
    spec = BACKBONES[config["backbone"]]
    if not config["layers"]:
        st.warning("Choose at least one layer.")
        return
    stride = min(spec.layers[layer][0] for layer in config["layers"])
    side = -(-config["image_size"] // stride)
    c = config["n_features"]
    megabytes = side * side * c * (c + 1) * 4 / 2**20
    train, held = split_holdout(items) if hold_out else (items, [])
    # Files are decoded only when fitting; a tenth of the usable ones is held out.
    of_usable = " (a tenth of those that can be read)" if held else ""
    st.caption(
        f"{len(train):,} files to fit on, {len(held):,} held out{of_usable} · "
        f"feature grid {side} × {side} · model file about {megabytes:,.0f} MB"
    )
    if items and len(train) <= c:
        st.caption(
            f"Tip: with {c} channels, more than {c} good images make the covariances "
            "rest on data rather than on the ridge."
        )


def _name_field(items: list[Item], root) -> str:
    """The model name: it follows the images chosen until the user edits it."""
    default = _default_name(items, root)
    offered = st.session_state.get(OFFERED_NAME_KEY)
    if st.session_state.get(NAME_KEY) in (None, offered):
        st.session_state[NAME_KEY] = default
    st.session_state[OFFERED_NAME_KEY] = default
    return st.text_input("Model name", key=NAME_KEY, persist_state=PERSIST)


def _default_name(items: list[Item], root) -> str:
    """A free model name after the images: the demo, a zip or folder, a date."""
    base = f"model-{date.today().isoformat()}"
    tops = {PurePosixPath(item.name).parts[0] for item in items if "/" in item.name}
    if is_demo(items):
        base = DEMO_MODEL_NAME
    elif len(tops) == 1 and all("/" in item.name for item in items):
        top = tops.pop()
        top = top[:-4] if top.lower().endswith(".zip") else top
        base = workspace.safe_name(top, base)
    return workspace.unique_name(base, root, names_in_use(root))


def _new_request(
    items, root, name, config, batch_size, hold_out, review
) -> FitRequest | None:
    try:
        name = workspace.check_name(name)
        make_config(**config)
    except ValueError as error:
        st.error(escape_markdown(error))
        return None
    return FitRequest(
        items=items,
        name=name,
        root=root,
        device=state.device(),
        batch_size=int(batch_size),
        hold_out=hold_out,
        review=review,
        **config,
    )


def _extend_form(
    items: list[Item], entries: list[ModelEntry], root, busy: bool
) -> FitRequest | None:
    """Pick a model to add the images to; returns a request when started."""
    active = state.active_model()
    names = [entry.name for entry in entries]
    index = (
        names.index(active.name) if active is not None and active.name in names else 0
    )
    chosen = st.selectbox("Model to extend", names, index=index, key="fit_extend_model")
    entry = entries[names.index(chosen)]
    thresholds = entry.thresholds
    st.caption(
        f"{escape_markdown(entry.config.backbone)} · {entry.config.image_size} px · "
        f"{entry.n_images:,} images so far · image threshold {raw(thresholds.image)}. "
        "The new images are added to its statistics; nothing is refitted."
    )
    ready = _check_weights(entry.config.to_dict())
    label = f"Add {len(items):,} images" if items else "Add images"
    if not st.button(
        label,
        type="primary",
        icon=":material/add:",
        disabled=busy or not items or not ready,
    ):
        return None
    config = entry.config
    return FitRequest(
        items=items,
        name=entry.name,
        root=root,
        device=state.device(),
        backbone=config.backbone,
        layers=config.layers,
        n_features=config.n_features,
        image_size=config.image_size,
        seed=config.seed,
        pre_trained=config.pre_trained,
        hold_out=False,
        extend=entry.path,
    )


fit_page()
