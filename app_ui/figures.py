"""Plotly figures and overlay pictures, all on the model's one colour scale."""

from __future__ import annotations

import base64
import io

import numpy as np
import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from PIL import Image
from plotly.subplots import make_subplots
from sklearn.metrics import precision_recall_curve, roc_curve

from app_ui.scoring import Scale
from app_ui.widgets import raw
from padim_core import visualize

# Longest side of the pictures sent to the browser; enough to judge a defect,
# small enough to keep stepping through images quick.
DISPLAY_SIDE = 512

# Tick positions of the normalised scale; 0.5 is the threshold.
NORMALIZED_TICKS = (0.0, 0.25, 0.5, 0.75, 1.0)

# Height of one picture panel at a square aspect, in CSS pixels.
PANEL_HEIGHT = 320

# Pictures this much wider than tall are stacked, not put side by side, so
# that each keeps a useful size; stacked, a panel is about this wide.
STACK_ASPECT = 1.6
STACKED_WIDTH = 900

# Room above the panels of the inspection figure: the modebar sits in the top
# 30 px, so the panel titles go below it (on square images the "Outline"
# title would otherwise hide behind it).
MODEBAR_ROOM = 64

GOOD_COLOUR = "#2e7d32"
DEFECT_COLOUR = "#c62828"
THRESHOLD_COLOUR = "#f9a825"


def colourscale(steps: int = 11) -> list[list]:
    """The heatmap colours of :mod:`padim_core.visualize` as a plotly scale."""
    values = np.linspace(0.0, 1.0, steps)
    colours = visualize.colourize(values[None, :])[0]
    return [[float(v), f"rgb({r},{g},{b})"] for v, (r, g, b) in zip(values, colours)]


def display_image(image: Image.Image, side: int = DISPLAY_SIDE) -> Image.Image:
    """``image`` shrunk (never enlarged) so its longest side is at most ``side``."""
    scale = min(1.0, side / max(image.size))
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.convert("RGB").resize(size, Image.Resampling.BILINEAR)


def data_uri(image: Image.Image) -> str:
    """A PNG data URI, for plotly's image traces."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def overlay_picture(
    image: Image.Image,
    full_map: np.ndarray,
    scale: Scale,
    opacity: float,
    pixel_threshold: float | None,
) -> Image.Image:
    """Heatmap over ``image`` with the defect outline, as one picture."""
    picture = visualize.overlay(image, scale.normalize(full_map), opacity)
    if pixel_threshold is not None:
        picture = visualize.draw_outline(picture, full_map >= pixel_threshold)
    return picture


def pooled(full_map: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """The map's maximum over each patch cell, (h, w).

    The hottest cell then holds exactly the image score.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(full_map))[None, None]
    return F.adaptive_max_pool2d(tensor, grid)[0, 0].numpy()


def _colourbar(scale: Scale) -> dict:
    """A horizontal colour bar under the panels, labelled in raw distances."""
    labels = [raw(scale.raw(v)) for v in NORMALIZED_TICKS]
    text = [f"{label}<br>({v:.2f})" for label, v in zip(labels, NORMALIZED_TICKS)]
    text[2] = f"<b>{labels[2]}</b><br>(0.50, threshold)"
    return {
        "title": {"text": "Mahalanobis distance (normalised)", "side": "bottom"},
        "tickvals": list(NORMALIZED_TICKS),
        "ticktext": text,
        "orientation": "h",
        "thickness": 12,
        "len": 0.6,
        "y": -0.04,
        "yanchor": "top",
    }


def _heatmap(
    distances: np.ndarray, full_map: np.ndarray, scale: Scale, size, opacity: float
) -> go.Heatmap:
    """The patch grid over the picture; hover gives row, column and distances."""
    h, w = distances.shape
    width, height = size
    cells = pooled(full_map, (h, w))
    rows, cols = np.mgrid[0:h, 0:w]
    custom = np.stack([rows, cols, distances, cells], axis=-1)
    return go.Heatmap(
        z=scale.normalize(cells),
        x0=width / w / 2,
        dx=width / w,
        y0=height / h / 2,
        dy=height / h,
        zmin=0.0,
        zmax=1.0,
        zsmooth="best",
        opacity=opacity,
        colorscale=colourscale(),
        colorbar=_colourbar(scale),
        customdata=custom,
        hovertemplate=(
            "patch row %{customdata[0]}, column %{customdata[1]}<br>"
            "Mahalanobis distance %{customdata[2]:.2f}<br>"
            "smoothed map %{customdata[3]:.2f} (%{z:.2f} normalised)<extra></extra>"
        ),
    )


def inspection_figure(
    image: Image.Image,
    distances: np.ndarray,
    full_map: np.ndarray,
    scale: Scale,
    opacity: float,
    pixel_threshold: float | None,
) -> go.Figure:
    """Original, heatmap and outline side by side, zooming together.

    Args:
        image: The original picture, RGB.
        distances: Patch distances (h, w) of the image.
        full_map: Its blurred anomaly map (S, S), raw distances.
        scale: The model's colour scale.
        opacity: Opacity of the heatmap, 0 to 1.
        pixel_threshold: Raw map value whose outline is drawn; None for none.
    """
    shown = display_image(image)
    outlined = shown
    if pixel_threshold is not None:
        outlined = visualize.draw_outline(shown, full_map >= pixel_threshold)
    stacked = shown.width >= STACK_ASPECT * shown.height
    fig = make_subplots(
        rows=3 if stacked else 1,
        cols=1 if stacked else 3,
        subplot_titles=("Original", "Heatmap (hover a patch)", "Outline"),
        horizontal_spacing=0.015,
        vertical_spacing=0.06,
    )
    for k, picture in enumerate((shown, shown, outlined), start=1):
        trace = go.Image(source=data_uri(picture), x0=0.5, y0=0.5, hoverinfo="skip")
        fig.add_trace(trace, row=k if stacked else 1, col=1 if stacked else k)
    heat = _heatmap(distances, full_map, scale, shown.size, opacity)
    fig.add_trace(heat, row=2 if stacked else 1, col=1 if stacked else 2)
    _image_axes(fig, shown.size, stacked)
    return fig


def _image_axes(fig: go.Figure, size: tuple[int, int], stacked: bool) -> None:
    width, height = size
    fig.update_xaxes(range=[0, width], visible=False, matches="x", constrain="domain")
    fig.update_yaxes(
        range=[height, 0],
        visible=False,
        matches="y",
        scaleanchor="x",
        constrain="domain",
    )
    if stacked:
        panels = 3 * np.clip(STACKED_WIDTH * height / width, 120, 400) + 60
    else:
        panels = np.clip(PANEL_HEIGHT * height / width, 160, 720)
    fig.update_layout(
        height=int(panels) + 100 + MODEBAR_ROOM,
        margin={"l": 0, "r": 0, "t": MODEBAR_ROOM, "b": 100},
        dragmode="zoom",
    )


def histogram_figure(
    good: np.ndarray, defective: np.ndarray, threshold: float, scale: Scale
) -> go.Figure:
    """Score histograms per class with the threshold; raw below, normalised above."""
    everything = np.concatenate([good, defective, [threshold]])
    edges = np.histogram_bin_edges(
        everything, bins=min(40, max(10, len(everything) // 3))
    )
    bins = {"start": edges[0], "end": edges[-1], "size": edges[1] - edges[0] or 1.0}
    fig = go.Figure()
    for scores, name, colour in (
        (good, "good", GOOD_COLOUR),
        (defective, "defective", DEFECT_COLOUR),
    ):
        if len(scores):
            fig.add_trace(
                go.Histogram(
                    x=scores,
                    name=f"{name} ({len(scores)})",
                    xbins=bins,
                    marker_color=colour,
                    opacity=0.6,
                )
            )
    fig.add_vline(x=threshold, line={"color": THRESHOLD_COLOUR, "width": 3})
    fig.add_annotation(
        x=threshold,
        y=0.97,
        yref="paper",
        text=f" threshold {raw(threshold)}",
        showarrow=False,
        xanchor="left",
        yanchor="top",
        bgcolor="rgba(255,255,255,0.8)",
    )
    span = [edges[0], edges[-1]]
    fig.update_layout(
        barmode="overlay",
        height=330,
        margin={"l": 10, "r": 10, "t": 60, "b": 10},
        xaxis={"title": "image score (raw Mahalanobis distance)", "range": span},
        xaxis2=_normalized_axis(scale, span),
        yaxis_title="images",
        legend={"orientation": "h", "y": -0.3},
    )
    fig.add_trace(
        go.Scatter(
            x=span,
            y=[0, 0],
            xaxis="x2",
            mode="markers",
            marker_opacity=0,
            showlegend=False,
            hoverinfo="skip",
        )
    )
    return fig


def _normalized_axis(scale: Scale, span: list[float]) -> dict:
    return {
        "title": "normalised (threshold = 0.5)",
        "overlaying": "x",
        "side": "top",
        "range": span,
        "tickvals": [scale.raw(v) for v in NORMALIZED_TICKS],
        "ticktext": [f"{v:.2f}" for v in NORMALIZED_TICKS],
        "showgrid": False,
    }


def roc_figure(labels: np.ndarray, scores: np.ndarray, threshold: float) -> go.Figure:
    """ROC curve with the current threshold marked."""
    fpr, tpr, _ = roc_curve(labels, scores)
    flagged = scores >= threshold
    point = (flagged[labels == 0].mean(), flagged[labels == 1].mean())
    fig = go.Figure(
        go.Scatter(x=fpr, y=tpr, mode="lines", name="ROC", line={"color": "#1565c0"})
    )
    fig.add_trace(
        go.Scatter(
            x=[0, 1],
            y=[0, 1],
            mode="lines",
            name="chance",
            line={"color": "#9e9e9e", "dash": "dot"},
        )
    )
    _mark(fig, point, "false-reject rate %{x:.1%}<br>defects caught %{y:.1%}")
    fig.update_layout(
        xaxis_title="false-reject rate (good parts flagged)",
        yaxis_title="defects caught",
        title="ROC",
    )
    return _small(fig)


def pr_figure(labels: np.ndarray, scores: np.ndarray, threshold: float) -> go.Figure:
    """Precision-recall curve with the current threshold marked."""
    precision, recall, _ = precision_recall_curve(labels, scores)
    flagged = scores >= threshold
    caught = flagged[labels == 1].mean()
    precision_here = labels[flagged].mean() if flagged.any() else 1.0
    fig = go.Figure(
        go.Scatter(
            x=recall, y=precision, mode="lines", name="PR", line={"color": "#6a1b9a"}
        )
    )
    _mark(fig, (caught, precision_here), "recall %{x:.1%}<br>precision %{y:.1%}")
    fig.update_layout(
        xaxis_title="recall (defects caught)",
        yaxis_title="precision",
        title="Precision-recall",
    )
    return _small(fig)


def _mark(fig: go.Figure, point: tuple[float, float], template: str) -> None:
    fig.add_trace(
        go.Scatter(
            x=[point[0]],
            y=[point[1]],
            mode="markers",
            name="current threshold",
            marker={
                "size": 13,
                "color": THRESHOLD_COLOUR,
                "line": {"color": "black", "width": 1},
            },
            hovertemplate=template + "<extra>current threshold</extra>",
        )
    )


def _small(fig: go.Figure) -> go.Figure:
    fig.update_layout(
        height=340,
        margin={"l": 10, "r": 10, "t": 40, "b": 10},
        xaxis_range=[-0.02, 1.02],
        yaxis_range=[-0.02, 1.02],
        legend={"orientation": "h", "y": -0.25},
    )
    return fig
