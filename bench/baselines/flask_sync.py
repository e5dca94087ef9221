"""The seed documents' design, as the baseline pinfer must beat: synchronous Flask, batch 1.

The model is loaded once per process (the worker's own runtime, so the same artifact, runtime
and precision as the pinfer variant it is compared with, from the same ``PINFER_*`` settings) and
every request decodes, preprocesses (``shared.transforms``, the same code) and classifies its one
image before answering. No queue, no batching, no Redis. Run under gunicorn, one sync worker:

    PINFER_MODEL_DIR=weights/build gunicorn -w 1 'bench.baselines.flask_sync:create_app()'

It answers ``POST /v1/predictions`` with the finished record (200, ``status: succeeded``) so that
the benchmark drives it through the same ``pinfer_client.sdk`` call as pinfer.
"""
from __future__ import annotations

import uuid

from flask import Flask, jsonify, request

from shared.errors import ImageError
from shared.labels import load_labels
from shared.settings import Settings
from shared.transforms import preprocess


def create_app(settings: Settings | None = None) -> Flask:
    from bench.benchmarks.inprocess import load_runtime  # the worker's runtime factory

    settings = settings or Settings.from_env()
    runtime = load_runtime(settings)  # loaded once, before the first request
    labels = load_labels()
    app = Flask(__name__)

    @app.get("/healthz")
    def healthz():  # noqa: ANN202
        return {"status": "ok"}

    @app.post("/v1/predictions")
    def predict():  # noqa: ANN202
        # Like pinfer: the multipart field `image`, else the raw body (what the SDK sends).
        upload = request.files.get("image") if request.mimetype == "multipart/form-data" else None
        data = upload.read() if upload is not None else request.get_data()
        if not data:
            return jsonify(error={"code": "missing_image", "message": "send the image as form field `image` "
                                  "or as the raw body"}), 400
        try:
            x = preprocess(data, settings)
        except ImageError as exc:
            # a finished record, like pinfer's for a bad image (the SDK then reads it, not raises)
            return jsonify(id=uuid.uuid4().hex, status="failed", error={"code": exc.code, "message": exc.message})
        probs = runtime.forward(x[None])[0]
        idx, scores = runtime.top_k(probs, int(request.values.get("top_k", 5)))
        return jsonify(id=uuid.uuid4().hex, status="succeeded", model=runtime.info.public(),
                       top_k=[{"label": labels[i], "class_index": int(i), "score": float(s)}
                              for i, s in zip(idx, scores)])

    return app
