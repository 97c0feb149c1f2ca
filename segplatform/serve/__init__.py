"""Online segmentation endpoints on Ray Serve (README "Serving").

- ``settings``: ``ServeSettings`` (limits, admission, batching, autoscaling, API key) and the
  Serve deployment options they imply;
- ``inputs``: body caps, media types, multipart, image decoding and checks (``ClientError``);
- ``model``: model URIs (``models:/NAME@ALIAS`` resolved to a version), loading, batched inference;
- ``render``: indexed PNG, JSON (areas, COCO RLE) and overlay answers;
- ``app``: the ``SegmentationService`` deployment with its FastAPI ingress and ``build_app``,
  the builder ``serve run`` / ``serve deploy`` import (``segplatform.serve.app:build_app``);
- ``runner``: what ``segplatform serve`` does (join or start Ray, start Serve, run, clean up).
"""
