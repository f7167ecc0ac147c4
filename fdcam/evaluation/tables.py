"""Run summaries as plain-text and markdown tables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["format_table", "markdown_table"]


def _rows(summary: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    methods = summary["methods"]
    if summary["metric"] == "insertion-deletion":
        header = ["Method", "Insertion ↑", "Deletion ↓", "Overall ↑", "Explain s/img", "Ins+del s/img"]
        rows = [
            [
                label,
                f"{m['insertion']:.4f}",
                f"{m['deletion']:.4f}",
                f"{m['overall']:.4f}",
                f"{m['explain_seconds_per_image']:.2f}",
                f"{m['metric_seconds_per_image']:.2f}",
            ]
            for label, m in methods.items()
        ]
        return header, rows
    header = ["Method", "Composites ↑", "Hits", "Misses"]
    multi = summary.get("multi_object", {}).get("methods")
    if multi:
        header.append("Multi-object ↑")
    header.append("Explain s/img")
    rows = []
    for label, m in methods.items():
        row = [label, f"{m['accuracy']:.4f}", str(m["hits"]), str(m["misses"])]
        if multi:
            row.append(f"{multi[label]['hits']}/{multi[label]['hits'] + multi[label]['misses']}")
        seconds = m.get("explain_seconds_per_image")
        row.append(f"{seconds:.2f}" if seconds is not None else "-")
        rows.append(row)
    return header, rows


def _title(summary: Mapping[str, Any]) -> str:
    if summary["metric"] == "insertion-deletion":
        return (
            f"Insertion/deletion on {summary['n_images']} images ({summary['model']}, layer {summary['layer']}, "
            f"target {summary['target']}; overall = insertion - deletion)"
        )
    return (
        f"Pointing game on {summary['n_images']} composites ({summary['model']}, layer {summary['layer']}, "
        f"tolerance {summary['tolerance']} px; accuracy = hits / (hits + misses))"
    )


def format_table(summary: Mapping[str, Any]) -> str:
    """A plain-text table of a run summary (Table I style for insertion/deletion)."""
    header, rows = _rows(summary)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [_title(summary)]
    for row in [header, *rows]:
        lines.append(
            "  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row))
        )
    return "\n".join(lines)


def markdown_table(summary: Mapping[str, Any], labels: Sequence[str] | None = None) -> str:
    """A markdown table of a run summary, optionally only (and in the order of) the given method labels."""
    header, rows = _rows(summary)
    if labels is not None:
        by_label = {row[0]: row for row in rows}
        rows = [by_label[label] for label in labels if label in by_label]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
