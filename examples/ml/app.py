"""An import-heavy app: numpy, scipy, scikit-learn and pandas, with a model trained in
on_start. A fresh start spends most of its time importing and training; a restore
from the checkpoint skips both.

    python -m beam serve examples/ml/app.py:predict
    python -m beam call tcp://127.0.0.1:8765 '{"features": [[0.1, 0.2, 0.3, 0.4]]}'
"""
import numpy as np
import pandas as pd
import scipy.stats
from sklearn.ensemble import RandomForestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from beam import endpoint


def train():
    rng = np.random.default_rng(7)
    frame = pd.DataFrame(rng.normal(size=(2000, 4)), columns=["a", "b", "c", "d"])
    label = (frame.a + frame.b * 0.5 - frame.c > 0).astype(int)
    model = make_pipeline(StandardScaler(), RandomForestClassifier(n_estimators=50, random_state=0))
    model.fit(frame.values, label.values)
    skew = float(scipy.stats.skew(frame.a))
    return {"model": model, "columns": list(frame.columns), "skew": skew}


@endpoint(on_start=train, checkpoint_enabled=True, name="ml")
def predict(context, features=None):
    state = context.on_start_value
    x = np.asarray(features if features is not None else [[0.0, 0.0, 0.0, 0.0]], dtype=float)
    proba = state["model"].predict_proba(x)[:, 1]
    return {"probability": proba.tolist(), "skew": state["skew"]}
