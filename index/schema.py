"""SQLAlchemy tables of the metadata store, and the schema version they describe."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Float, Integer, LargeBinary, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: Bump this and add a step to ``index.migrations.MIGRATIONS`` for every change below.
SCHEMA_VERSION = 3


class Base(DeclarativeBase):
    """Declarative base of the store's tables."""


class Meta(Base):
    """Key-value facts about the whole index: schema version, models, generation."""

    __tablename__ = "retriever_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class ImageRow(Base):
    """One indexed image file.

    ``vector`` is the prefilter embedding (float32 bytes); the FAISS index is a cache rebuilt from
    these, so the database alone decides what is indexed. ``patch_offset``/``patch_tokens`` locate the
    image's ViLT visual tokens in the patch cache file.
    """

    __tablename__ = "images"
    # Ids are never reused (see index.migrations._migrate_2_to_3).
    __table_args__ = {"sqlite_autoincrement": True}  # noqa: RUF012 (SQLAlchemy reads it once)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    path: Mapped[str] = mapped_column(String(4096), unique=True)
    size: Mapped[int] = mapped_column(BigInteger)
    mtime: Mapped[float] = mapped_column(Float)
    content_hash: Mapped[str] = mapped_column(String(64), index=True)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    indexed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    prefilter_model: Mapped[str] = mapped_column(String(512))
    reranker_model: Mapped[str] = mapped_column(String(512))
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    patch_offset: Mapped[int] = mapped_column(BigInteger)
    patch_tokens: Mapped[int] = mapped_column(Integer)


class TextRow(Base):
    """One caption of the text collection searched by image→text queries."""

    __tablename__ = "texts"
    __table_args__ = {"sqlite_autoincrement": True}  # noqa: RUF012 (SQLAlchemy reads it once)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    ext_id: Mapped[str | None] = mapped_column(String(512), unique=True, nullable=True)
    text: Mapped[str] = mapped_column(Text)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    added_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
