"""The dynamic weighted ensemble: members and a gating network in ONE Keras model (design, the default five: ~1.67M).

The members are any subset of ``ARCHITECTURES`` (``TrainConfig.members``; the default is ``MEMBERS``, the five
of the design, PatchTST being the sixth to add); the gate weighs however many there are.

Outputs, by the registry contract (DESIGN.md): ``score`` [B], ``member_scores`` [B,M], ``weights`` [B,M] and,
for ``forecast``, ``feature_error`` [B,F]. The input ``window`` [B, window, F] is already scaled.
Members take the whole window, except for ``forecast`` where they see all but the last step and predict it.

What ``score`` means, by task (higher is worse):

- classify: the gate-weighted probability of an event, in [0, 1];
- regress: the gate-weighted predicted delay, in minutes;
- classify with the monitor (``train --monitor``): the monitor's ratio to its limit, as for forecast, its limits
  raised as far as the labelled faults allow (``members.monitor.fault_factor``); the classifier members and the
  gate still run, their probabilities in ``member_scores`` before the ratio;
- forecast (unsupervised): the statistical monitor's ratio to its limit (``members.monitor``; 1 is the alarm
  limit). On short normal histories a neural forecaster cannot set limits that hold on the next normal day, so
  the monitor decides; the member forecasters still run, and their gate-combined squared error per feature
  (``feature_error``) says which features deviate. ``member_scores`` holds each forecaster's error and, last,
  the monitor's ratio (its weight is 1).
"""

from __future__ import annotations

from types import ModuleType
from typing import Sequence

from fabwatch.models.members import cnn_lstm, monitor, patchtst, residual_gru, rules, spike, stacked_lstm
from fabwatch.models.common import (
    DropLastStep,
    ForecastCombine,
    LastStep,
    MeanOverFeatures,
    Size,
    Task,
    WeightedSum,
    MonitorWeight,
    StaticWeights,
    WindowStats,
    task_head,
    units,
)
from fabwatch.models.tf import keras, tf

ARCHITECTURES: dict[str, ModuleType] = {m.NAME: m for m in (stacked_lstm, residual_gru, cnn_lstm, spike, rules,
                                                              patchtst)}
MEMBERS: dict[str, ModuleType] = {n: ARCHITECTURES[n] for n in list(ARCHITECTURES)[:5]}  # the default ensemble
DESIGN_PARAMS = 1_670_000  # of the default ensemble
OUTPUTS = ("score", "member_scores", "weights")
FORECAST_OUTPUTS = (*OUTPUTS, "feature_error")


def output_names(task: Task) -> tuple[str, ...]:
    return FORECAST_OUTPUTS if task == "forecast" else OUTPUTS


def member_steps(window: int, task: Task) -> int:
    """How many steps a member sees: the forecast predicts the window's last step from the others."""
    return window - 1 if task == "forecast" else window


def build_member(name: str, window: int, n_features: int, task: Task, size: Size = "full",
                 target_mean: float = 0.0, target_std: float = 1.0) -> keras.Model:
    """One member as its own model, trainable on its own: trunk of its architecture, head of the task.

    An architecture with its own ``forecast(inputs, size)`` predicts the next step itself (PatchTST: a
    channel-independent head whose output RevIN de-normalises)."""
    module = ARCHITECTURES[name]
    inputs = keras.Input((member_steps(window, task), n_features), name="window")
    if task == "forecast" and hasattr(module, "forecast"):
        out = keras.layers.Activation("linear", dtype="float32", name="out")(module.forecast(inputs, size))
    else:
        out = task_head(module.trunk(inputs, size), task, n_features, target_mean, target_std)
    return keras.Model(inputs, out, name=name)


def build_gate(window: int, n_features: int, n_members: int, size: Size = "full") -> keras.Model:
    """Per-input softmax weights over the members from the window's per-feature mean, std and last value."""
    inputs = keras.Input((window, n_features), name="window")
    x = keras.layers.Dense(units(64, size), activation="relu", name="hidden")(WindowStats(name="stats")(inputs))
    x = keras.layers.Dense(n_members, name="logits")(x)
    return keras.Model(inputs, keras.layers.Softmax(dtype="float32", name="softmax")(x), name="gate")


def static_gate(weights: list[float], window: int, n_features: int) -> keras.Model:
    """A gate that gives every window the same ``weights`` (searched on out-of-fold scores), named like the
    learned gate so the assembled ensemble keeps the contract's outputs: ``weights`` is that constant vector."""
    inputs = keras.Input((window, n_features), name="window")
    return keras.Model(inputs, StaticWeights(weights, dtype="float32", name="static")(inputs), name="gate")


def _stack(members: list[keras.Model], outs: list[tf.Tensor], task: Task, n_features: int) -> tf.Tensor:
    """Member outputs side by side: [B,M] (probability or minutes) or [B,M,F] (forecasts). One member's output
    is used as it is (a saved ``Concatenate`` of one input does not load)."""
    if task == "forecast":
        outs = [keras.layers.Reshape((1, n_features), name=f"{m.name}_forecast")(o) for m, o in zip(members, outs)]
    if len(outs) == 1:
        return outs[0]
    return keras.layers.Concatenate(axis=1 if task == "forecast" else -1,
                                    name="forecasts" if task == "forecast" else "member_concat")(outs)


def _combine(stacked: tf.Tensor, weights: tf.Tensor, inputs: tf.Tensor, task: Task) -> dict[str, tf.Tensor]:
    """The contract's outputs from stacked member outputs and gate weights."""
    if task == "forecast":
        member_err, feature_err = ForecastCombine(name="combine")([stacked, weights, LastStep(name="target")(inputs)])
        return {"weights": weights, "member_scores": member_err, "feature_error": feature_err,
                "score": MeanOverFeatures(name="mean_error")(feature_err)}
    return {"weights": weights, "member_scores": stacked, "score": WeightedSum(name="weighted")([stacked, weights])}


def resolve_members(spec: str | None) -> list[str]:
    """``--members``: a comma list of architectures (``stacked_lstm,patchtst``), or ``+name,...`` to add to the
    default five (``+patchtst``); None or empty: the five. ValueError names the bad part."""
    parts = [p.strip() for p in (spec or "").split(",") if p.strip()]
    adding = [p.startswith("+") for p in parts]
    if any(adding) and not all(adding):
        raise ValueError(f"either list the members or add to the default with +NAME, not both: {spec!r}")
    names = [*MEMBERS, *(p[1:] for p in parts)] if all(adding) else parts
    return check_members(names)


def check_members(names: Sequence[str]) -> list[str]:
    """``names`` as a list when they are known, distinct architectures; ValueError otherwise."""
    unknown = [n for n in names if n not in ARCHITECTURES]
    if unknown:
        raise ValueError(f"unknown member {unknown[0]!r} (choose from {', '.join(ARCHITECTURES)})")
    if len(set(names)) != len(names):
        raise ValueError(f"a member is listed twice: {', '.join(names)}")
    return list(names)


def member_names(task: Task, members: Sequence[str] = tuple(MEMBERS), with_monitor: bool = False) -> list[str]:
    """The manifest's member list: the members, and for the forecast task (or ``with_monitor``) the statistical
    monitor last."""
    return [*members, monitor.NAME] if task == "forecast" or with_monitor else list(members)


def assemble(members: list[keras.Model], gate: keras.Model, window: int, n_features: int,
             task: Task, stat_monitor: keras.layers.Layer | None = None) -> keras.Model:
    """Wire trained (or fresh) members and a gate into the serving model with the contract's outputs.

    ``stat_monitor``: the fitted monitor layer, whose ratio becomes the score (forecast; classify with
    ``TrainConfig.monitor``, where ``member_scores`` holds the members' probabilities, then the ratio).
    """
    inputs = keras.Input((window, n_features), name="window")
    context = DropLastStep(name="context")(inputs) if task == "forecast" else inputs
    stacked = _stack(members, [m(context) for m in members], task, n_features)
    named = _combine(stacked, gate(inputs), inputs, task)
    if stat_monitor is not None:
        ratio = stat_monitor(inputs)
        named["score"] = ratio
        named["member_scores"] = keras.layers.Concatenate(name="with_monitor")(
            [named["member_scores"], keras.layers.Reshape((1,), name="monitor_column")(ratio)])
        named["weights"] = MonitorWeight(name="monitor_weight")(named["weights"])
    outputs = [keras.layers.Activation("linear", dtype="float32", name=n)(named[n]) for n in output_names(task)]
    return keras.Model(inputs, outputs, name="ensemble")


def gate_trainer(gate: keras.Model, window: int, n_features: int, n_members: int, task: Task) -> keras.Model:
    """The gate on precomputed outputs of the frozen members: the ensemble's score with the same math, but
    without running the members every epoch (their outputs cannot change while frozen)."""
    inputs = keras.Input((window, n_features), name="window")
    stacked = keras.Input((n_members, n_features) if task == "forecast" else (n_members,), name="member_outputs")
    score = _combine(stacked, gate(inputs), inputs, task)["score"]
    return keras.Model([inputs, stacked], keras.layers.Activation("linear", dtype="float32", name="score")(score),
                       name="gate_trainer")


def build(window: int = 100, n_features: int = 12, task: Task = "classify", size: Size = "full",
          target_mean: float = 0.0, target_std: float = 1.0, members: Sequence[str] = tuple(MEMBERS)) -> keras.Model:
    """A fresh ensemble (untrained) of ``members`` (default: the five)."""
    members = [build_member(n, window, n_features, task, size, target_mean, target_std) for n in check_members(members)]
    return assemble(members, build_gate(window, n_features, len(members), size), window, n_features, task)


def parameter_counts(model: keras.Model) -> dict[str, int]:
    """Parameters per member and gate, plus the total, of an assembled ensemble."""
    counts = {name: model.get_layer(name).count_params() for name in (*_member_layers(model), "gate")}
    counts["total"] = model.count_params()
    return counts


def design_parameters(members: Sequence[str] = tuple(MEMBERS)) -> dict[str, int]:
    """The design figures (100 x 12 window) per member, and the total of an ensemble of ``members``: the
    design's total with the members' figures added or taken away."""
    per_member = {name: ARCHITECTURES[name].DESIGN_PARAMS for name in members}
    total = DESIGN_PARAMS + sum(per_member.values()) - sum(m.DESIGN_PARAMS for m in MEMBERS.values())
    return per_member | {"total": total}


def _member_layers(model: keras.Model) -> list[str]:
    return [layer.name for layer in model.layers if layer.name in ARCHITECTURES]


def members_of(model: keras.Model) -> tuple[list[keras.Model], keras.Model]:
    """The member models (in the ensemble's order) and the gate inside an assembled ensemble (warm start, gate
    training)."""
    return [model.get_layer(n) for n in _member_layers(model)], model.get_layer("gate")


