"""Clinicians' sites, and "one first outcome per prediction" as a database constraint.

- ``user_sites``: the sites a user may act for (``cxr users add --site``, ``cxr users sites``).
- ``outcomes``: a unique index on ``prediction_id`` where ``supersedes_id IS NULL`` (one first outcome,
  across processes and replicas) and a unique ``supersedes_id`` (one correction per superseded row).

A database written by several replicas before this constraint may already hold two first outcomes for
one prediction: the upgrade stops and names how many, instead of choosing one (a clinician resolves
each with a signed correction through the API of the previous release, then upgrades).

Revision ID: 0003
Revises: 0002
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    dup = op.get_bind().execute(sa.text(
        "SELECT COUNT(*) FROM (SELECT prediction_id FROM outcomes WHERE supersedes_id IS NULL "
        "GROUP BY prediction_id HAVING COUNT(*) > 1) d")).scalar()
    if dup:
        raise RuntimeError(f"{dup} prediction(s) hold more than one first outcome (recorded concurrently before "
                           "this release): resolve each with a signed correction, then run `cxr db upgrade` again")
    op.create_table('user_sites',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('site', sa.String(length=48), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('user_id', 'site', name='uq_user_sites_user_site')
    )
    with op.batch_alter_table('user_sites', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_user_sites_site'), ['site'], unique=False)
        batch_op.create_index(batch_op.f('ix_user_sites_user_id'), ['user_id'], unique=False)

    with op.batch_alter_table('outcomes', schema=None) as batch_op:
        batch_op.create_index('uq_outcomes_first_per_prediction', ['prediction_id'], unique=True, sqlite_where=sa.text('supersedes_id IS NULL'), postgresql_where=sa.text('supersedes_id IS NULL'))
        batch_op.create_index('uq_outcomes_supersedes', ['supersedes_id'], unique=True)


def downgrade() -> None:
    with op.batch_alter_table('outcomes', schema=None) as batch_op:
        batch_op.drop_index('uq_outcomes_supersedes')
        batch_op.drop_index('uq_outcomes_first_per_prediction', sqlite_where=sa.text('supersedes_id IS NULL'), postgresql_where=sa.text('supersedes_id IS NULL'))

    with op.batch_alter_table('user_sites', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_user_sites_user_id'))
        batch_op.drop_index(batch_op.f('ix_user_sites_site'))

    op.drop_table('user_sites')
