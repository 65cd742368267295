"""The review page at ``/review``: studies, the image with its anchors, the narrative and the
follow-up thread, for sites without an SR-capable viewer (plain HTML and JavaScript in
``static/``, no build step; the data routes in :mod:`node.review.routes`)."""
