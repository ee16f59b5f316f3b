"""The seed's predictor: fit a scikit-learn surrogate on sampled trials, score the whole grid, queue the best.

Parameters are encoded as numbers: rank as is; learning rate, weight decay and alpha in log10 (their
grids are geometric); categorical choices one-hot. The surrogate's leave-one-out error on the samples is
measured and stored, so the report says how much the prediction is worth instead of assuming it.
"""

from __future__ import annotations

import math
from typing import Any

from loraforge.tune.spec import Range, TuneSpec

_LOG_KEYS = {"learning_rate", "weight_decay", "lora_alpha"}


def _encoder(spec: TuneSpec):
    dims = spec.space.dimensions()

    def encode(params: dict[str, Any]) -> list[float]:
        out: list[float] = []
        for key, values in dims.items():
            value = params[key]
            if isinstance(values, Range) or all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                use_log = (values.log if isinstance(values, Range) else key in _LOG_KEYS) and float(value) > 0
                out.append(math.log10(float(value)) if use_log else float(value))
            else:
                out.extend(1.0 if value == v else 0.0 for v in values)
        return out

    return encode


def _surrogate(name: str, seed: int):
    if name == "gradient_boosting":
        from sklearn.ensemble import GradientBoostingRegressor

        return GradientBoostingRegressor(random_state=seed, n_estimators=100, max_depth=2)
    if name == "gaussian_process":
        from sklearn.gaussian_process import GaussianProcessRegressor
        from sklearn.gaussian_process.kernels import RBF, WhiteKernel

        return GaussianProcessRegressor(kernel=RBF() + WhiteKernel(), normalize_y=True, random_state=seed)
    from sklearn.ensemble import RandomForestRegressor

    return RandomForestRegressor(n_estimators=200, random_state=seed, min_samples_leaf=1)


def rank_grid(spec: TuneSpec, tested: list[tuple[dict, float]], grid: list[dict]) -> tuple[list[tuple[dict, float]], float]:
    """(untested grid points with their predicted accuracy, best first; leave-one-out MAE of the surrogate)."""
    import numpy as np
    from sklearn.model_selection import LeaveOneOut, cross_val_predict

    encode = _encoder(spec)
    x = np.array([encode(p) for p, _ in tested])
    y = np.array([acc for _, acc in tested])
    model = _surrogate(spec.predict.surrogate, spec.seed)
    loo = cross_val_predict(model, x, y, cv=LeaveOneOut())
    mae = float(np.mean(np.abs(loo - y)))
    model.fit(x, y)
    seen = {tuple(sorted(p.items())) for p, _ in tested}
    todo = [p for p in grid if tuple(sorted(p.items())) not in seen]
    predicted = model.predict(np.array([encode(p) for p in todo])) if todo else []
    ranked = sorted(zip(todo, (float(v) for v in predicted)), key=lambda item: -item[1])
    return ranked, mae


def enqueue_verification(study, spec: TuneSpec) -> dict | None:
    """After the sampled trials: fit, predict the grid, queue the top `verify`. Once per study."""
    from optuna.trial import TrialState

    from loraforge.tune.space import grid

    if study.user_attrs.get("prediction"):
        return study.user_attrs["prediction"]
    samples = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
               if t.user_attrs.get("phase") == "sample"]
    if len(samples) < 3:
        return None
    dims = spec.space.dimensions()
    tested = [({k: t.params[k] for k in dims}, float(t.value)) for t in samples]
    points = grid(spec)
    ranked, mae = rank_grid(spec, tested, points)
    chosen = ranked[:spec.predict.verify]
    for params, predicted in chosen:
        study.enqueue_trial(params, user_attrs={"queued": "predict", "phase": "verify", "predicted": round(predicted, 4)})
    prediction = {"surrogate": spec.predict.surrogate, "samples": len(samples), "grid": len(points),
                  "loo_mae": round(mae, 4), "queued": len(chosen)}
    study.set_user_attr("prediction", prediction)
    return prediction
