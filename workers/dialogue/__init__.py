"""The anchored follow-up dialogue: resolve (which anchors a question is about), intents,
prompts and answers of the model, compose (EN/ZH answers), turn (one turn end to end)."""
