"""bench/apps/stream.py's generator behind FastAPI's StreamingResponse, as SSE.

    uvicorn bench.apps.stream_fastapi:app --host 127.0.0.1 --port 8000

A plain generator, as the beam handler: Starlette iterates it in its thread pool.
"""
import json

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from bench.apps.stream import chunks

app = FastAPI()


@app.post("/")
async def stream(request: Request):
    n = (await request.json()).get("n", 1000)
    return StreamingResponse((f"data: {json.dumps(c, separators=(',', ':'))}\n\n" for c in chunks(n)),
                             media_type="text/event-stream")
