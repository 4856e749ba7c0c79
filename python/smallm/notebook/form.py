"""The dashboard's settings form: a widget per field of a run's configuration dataclass, and the validated
configuration they make.

Each field is shown with its default and its help (as a tooltip): a dropdown for a choice, a checkbox for a
flag, else a text box that is empty for "the default". :meth:`SettingsForm.config` checks the values with the
same :func:`~smallm.train.config.build_config` as the command line, so a bad value gets its message.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import ipywidgets as w

from smallm.options import default_of, field_type
from smallm.train.config import RunConfig, build_config

__all__ = ["SettingsForm", "action_button"]


class SettingsForm:
    """A widget per field of a configuration dataclass, and the validated configuration they make. ``labels``
    and ``placeholders``: what a field's widget is called and what its empty text box says, when not its name
    and "default"."""

    def __init__(
        self, cls: type[RunConfig], names: Sequence[str], values: dict[str, Any] | None = None, *,
        labels: Mapping[str, str] | None = None, placeholders: Mapping[str, str] | None = None,
    ) -> None:  # fmt: skip
        self.cls = cls
        self.by_name = {f.name: f for f in dataclasses.fields(cls)}
        unknown = [n for n in names if n not in self.by_name]
        if unknown:
            raise ValueError(f"{cls.__name__} has no setting(s) {unknown}")
        self.fields = [self.by_name[n] for n in names]
        self.extra = dict(values or {})  # settings not shown (a config file's, or a run's) kept as given
        self.widgets: dict[str, w.ValueWidget] = {}
        for f in self.fields:
            default = self.extra.pop(f.name, default_of(f))
            label = (labels or {}).get(f.name, f.name.replace("_", " "))
            self.widgets[f.name] = _widget_for(f, default, label, (placeholders or {}).get(f.name, "default"))
        self.box = w.GridBox(
            list(self.widgets.values()), layout=w.Layout(grid_template_columns="repeat(3, minmax(0, 1fr))")
        )

    def values(self) -> dict[str, Any]:
        """The settings as the dataclass takes them (empty text: the field's default)."""
        values = dict(self.extra)
        for f in self.fields:
            values[f.name] = _parse(f, self.widgets[f.name].value)
        return values

    def value(self, name: str) -> Any:
        """One setting: its widget's value as the dataclass takes it, else the one kept unshown, else its default."""
        if name in self.widgets:
            return _parse(self.by_name[name], self.widgets[name].value)
        return self.extra[name] if name in self.extra else default_of(self.by_name[name])

    def chosen(self) -> dict[str, Any]:
        """The settings given on purpose: those not shown (the constructor's, a run's) and the shown ones that
        differ from their defaults; what ``--resume`` keeps rather than taking the run's."""
        values = dict(self.extra)
        for f in self.fields:
            value = _parse(f, self.widgets[f.name].value)
            if value != default_of(f):
                values[f.name] = value
        return values

    def config(self, **overrides: Any) -> RunConfig:
        """The validated configuration: ``ValueError`` with the command line's message for a bad value."""
        return build_config(self.cls, {**self.values(), **overrides}, source="settings")

    def set(self, **values: Any) -> None:
        for name, value in values.items():
            if name in self.widgets:
                self.widgets[name].value = _shown(self.by_name[name], value)
            else:
                self.extra[name] = value


def action_button(label: str, style: str, css: str, tooltip: str) -> w.Button:
    """A button with its CSS class (for styling and for tests that drive a browser)."""
    button = w.Button(description=label, button_style=style, tooltip=tooltip)
    button.add_class(css)
    return button


def _widget_for(f: dataclasses.Field, value: Any, label: str, placeholder: str) -> w.ValueWidget:
    """The widget of one setting: a dropdown for a choice, a checkbox for a flag, else a text box (empty
    for "the default")."""
    tooltip = f.metadata.get("help", "")
    style, layout = {"description_width": "110px"}, w.Layout(width="auto")
    choices = f.metadata.get("choices")
    if choices:
        return w.Dropdown(options=list(choices), value=value, description=label, tooltip=tooltip, style=style,
                          layout=layout)  # fmt: skip
    if field_type(f.type) is bool:
        return w.Checkbox(value=bool(value), description=label, tooltip=tooltip, indent=False, layout=layout)
    return w.Text(value=_shown(f, value), placeholder=placeholder, description=label, tooltip=tooltip, style=style,
                  layout=layout)  # fmt: skip


def _shown(f: dataclasses.Field, value: Any) -> Any:
    """A setting's value as its widget shows it."""
    if f.metadata.get("choices") or field_type(f.type) is bool:
        return value
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):  # a mixture: DIR:WEIGHT, ...
        return ", ".join(f"{d['path']}:{d['weight']}" if isinstance(d, dict) else str(d) for d in value)
    return str(value)


def _parse(f: dataclasses.Field, value: Any) -> Any:
    """A widget's value as the dataclass field takes it; ``ValueError`` naming the field."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if not text:
        return default_of(f)
    if f.metadata.get("repeatable") and "," in text:  # a mixture, as --data DIR:WEIGHT repeated
        return [part.strip() for part in text.split(",") if part.strip()]
    kind = field_type(f.type)
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise ValueError(f"settings: {f.name} must be {kind.__name__}, got {text!r}") from None
    return text
