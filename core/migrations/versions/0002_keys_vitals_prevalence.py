"""Keyed audit (key id per entry), signed artefact digests, vitals ahead of DICOM studies, site prevalence.

- ``audit_trail.key_id``: which audit key an entry's HMAC used (rotation; a missing key is named).
- ``e_signatures.artifact_sha256``: the approval signs the model artefact's digest (serving checks it).
- ``pending_vitals``: ``PUT /v1/vitals/{accession}`` (by keyed hash, bounded time).
- ``predictions.deployment_prevalence`` / ``p_covid19_at_site_prevalence``: the prior-shift correction.

Every new column is nullable: existing rows keep their values and their audit row hashes (NULL columns
are not hashed).

Revision ID: 0002
Revises: 0001
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('pending_vitals',
    sa.Column('accession_hash', sa.String(length=64), nullable=False),
    sa.Column('vitals', sa.Text(), nullable=False),
    sa.Column('stored_at', sa.String(length=40), nullable=False),
    sa.Column('expires_at', sa.String(length=40), nullable=False),
    sa.Column('stored_by', sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint('accession_hash')
    )
    with op.batch_alter_table('pending_vitals', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_pending_vitals_expires_at'), ['expires_at'], unique=False)

    with op.batch_alter_table('audit_trail', schema=None) as batch_op:
        batch_op.add_column(sa.Column('key_id', sa.String(length=64), nullable=True))

    if not sa.inspect(op.get_bind()).has_table("e_signatures"):
        # the release created e_signatures only once an approval module had been imported: a database that
        # never saw an approval lacks it; create it as the release defined it, then add the new column
        _create_release_e_signatures()
    with op.batch_alter_table('e_signatures', schema=None) as batch_op:
        batch_op.add_column(sa.Column('artifact_sha256', sa.String(length=64), nullable=True))

    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('deployment_prevalence', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('p_covid19_at_site_prevalence', sa.Float(), nullable=True))


def _create_release_e_signatures() -> None:
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("cxr_migration_0001",
                                                  Path(__file__).with_name("0001_release_schema.py"))
    baseline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(baseline)
    baseline.create_e_signatures()


def downgrade() -> None:
    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.drop_column('p_covid19_at_site_prevalence')
        batch_op.drop_column('deployment_prevalence')

    with op.batch_alter_table('e_signatures', schema=None) as batch_op:
        batch_op.drop_column('artifact_sha256')

    with op.batch_alter_table('audit_trail', schema=None) as batch_op:
        batch_op.drop_column('key_id')

    with op.batch_alter_table('pending_vitals', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_pending_vitals_expires_at'))

    op.drop_table('pending_vitals')
