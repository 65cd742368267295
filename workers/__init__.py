"""The GPU side: Celery app and tasks, imaging, engines, prompts, parsing, anchors."""
