"""The dialogue log: every follow-up turn of a study, as it was asked and answered.

A turn keeps the question, its language, the anchors it resolved to (or the candidates of
a clarifying answer), the anchor in focus afterwards (what "it" and "this lesion" mean in
the next question), the prompt version, the model's raw outputs, the answer and the
timings. The worker writes it (workers.dialogue); ``status`` and the tests read it. One
row per question: a redelivered follow-up task finds its turn and does not add another.

Questions and answers are patient data: they stay in the database, never in logs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Integer, String, Text, UniqueConstraint, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, mapped_column

from node.db import Base, Database, insert_new, utcnow

__all__ = ["DialogueLog", "Turn", "TurnRow"]


class TurnRow(Base):
    __tablename__ = "dialogue_turns"
    __table_args__ = (
        UniqueConstraint("question_id", name="uq_turn_question"),
        UniqueConstraint("study_uid", "turn", name="uq_turn_number"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    study_version: Mapped[int] = mapped_column(Integer)
    turn: Mapped[int] = mapped_column(Integer)
    question_id: Mapped[str] = mapped_column(String(64))
    question: Mapped[str] = mapped_column(Text)
    language: Mapped[str] = mapped_column(String(16))
    outcome: Mapped[str] = mapped_column(String(16))  # answered | clarify | failed
    resolved: Mapped[list[str]] = mapped_column(JSON)
    focus: Mapped[str | None] = mapped_column(String(16), nullable=True)
    intents: Mapped[list[str]] = mapped_column(JSON)
    prompt_version: Mapped[str] = mapped_column(String(64))
    model_outputs: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    answer: Mapped[str] = mapped_column(Text)
    timings: Mapped[dict[str, float]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


@dataclass(frozen=True)
class Turn:
    """One stored turn. ``resolved`` lists anchor ids in the order the question named
    them (for a clarifying answer: the candidates); ``focus`` is the anchor in focus after
    the turn; ``model_outputs`` are {"task", "text", "seconds"} per model call."""

    study_uid: str
    study_version: int
    turn: int
    question_id: str
    question: str
    language: str
    outcome: str
    resolved: tuple[str, ...]
    focus: str | None
    intents: tuple[str, ...]
    prompt_version: str
    model_outputs: tuple[dict[str, Any], ...] = ()
    answer: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, r: TurnRow) -> Turn:
        return cls(
            study_uid=r.study_uid,
            study_version=r.study_version,
            turn=r.turn,
            question_id=r.question_id,
            question=r.question,
            language=r.language,
            outcome=r.outcome,
            resolved=tuple(r.resolved or ()),
            focus=r.focus,
            intents=tuple(r.intents or ()),
            prompt_version=r.prompt_version,
            model_outputs=tuple(r.model_outputs or ()),
            answer=r.answer,
            timings=dict(r.timings or {}),
        )


class DialogueLog:
    """The turns of every study, in the node's database."""

    def __init__(self, engine: Engine) -> None:
        self.db = Database(engine)
        self.db.create_tables([TurnRow])

    def turns_of(self, study_uid: str) -> list[Turn]:
        """The study's turns, oldest first."""
        with self.db.transaction() as s:
            rows = s.execute(
                select(TurnRow).where(TurnRow.study_uid == study_uid).order_by(TurnRow.turn)
            ).scalars()
            return [Turn.of(r) for r in rows]

    def turn_for_question(self, question_id: str) -> Turn | None:
        with self.db.transaction() as s:
            row = s.execute(
                select(TurnRow).where(TurnRow.question_id == question_id)
            ).scalar_one_or_none()
            return Turn.of(row) if row else None

    def next_turn_number(self, study_uid: str) -> int:
        with self.db.transaction() as s:
            top = s.execute(
                select(func.max(TurnRow.turn)).where(TurnRow.study_uid == study_uid)
            ).scalar_one()
            return int(top or 0) + 1

    def record(self, turn: Turn) -> bool:
        """Store a turn; False when its question (or its turn number) is already stored."""
        row = {
            "study_uid": turn.study_uid,
            "study_version": turn.study_version,
            "turn": turn.turn,
            "question_id": turn.question_id,
            "question": turn.question,
            "language": turn.language,
            "outcome": turn.outcome,
            "resolved": list(turn.resolved),
            "focus": turn.focus,
            "intents": list(turn.intents),
            "prompt_version": turn.prompt_version,
            "model_outputs": list(turn.model_outputs),
            "answer": turn.answer,
            "timings": dict(turn.timings),
            "created_at": utcnow(),
        }
        with self.db.transaction() as s:
            return insert_new(s, TurnRow, [row], keys=("question_id",)) == 1

    def focus_of(self, turns: Sequence[Turn]) -> str | None:
        """The anchor in focus after the last turn that set one."""
        for t in reversed(turns):
            if t.focus:
                return t.focus
        return None
