"""The anchored follow-up dialogue: which anchors a question is about, and (later) the
grounded single-turn answers about them."""
