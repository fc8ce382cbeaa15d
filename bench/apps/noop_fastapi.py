"""The same no-op handler behind FastAPI, the baseline bench/serve.py compares against.

    uvicorn bench.apps.noop_fastapi:app --host 127.0.0.1 --port 8000 --workers 1 \
        --log-level warning --no-access-log

``app`` uses a plain ``def`` handler, like the beam endpoint (FastAPI runs it in its
thread pool). ``app_async`` is the ``async def`` variant, which skips the thread pool;
serve.py measures it too so the comparison is not against FastAPI's slower path only.
"""
from fastapi import FastAPI

app = FastAPI()


@app.post("/")
def predict():
    return {}


app_async = FastAPI()


@app_async.post("/")
async def predict_async():
    return {}
