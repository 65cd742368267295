"""One router per resource type (plus metadata, the async-job poll and the fallback)."""
