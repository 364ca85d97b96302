"""The schema of the last release before migrations (commit 8bb68d3): every table as ``create_all`` made it.

A database created by that release has these tables and no version table: ``cxr db upgrade`` stamps
it at this revision and upgrades from here.

Revision ID: 0001
Revises:
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('audit_trail',
    sa.Column('seq', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('time_utc', sa.String(length=40), nullable=False),
    sa.Column('actor', sa.String(length=200), nullable=False),
    sa.Column('role', sa.String(length=40), nullable=False),
    sa.Column('action', sa.String(length=80), nullable=False),
    sa.Column('subject', sa.String(length=200), nullable=False),
    sa.Column('details', sa.Text(), nullable=False),
    sa.Column('prev_hash', sa.String(length=64), nullable=False),
    sa.Column('entry_hash', sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint('seq')
    )
    op.create_index(op.f('ix_audit_trail_action'), 'audit_trail', ['action'], unique=False)
    create_e_signatures()
    op.create_table('predictions',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('created_at', sa.String(length=40), nullable=False),
    sa.Column('model_name', sa.String(length=100), nullable=False),
    sa.Column('model_version', sa.String(length=40), nullable=False),
    sa.Column('site', sa.String(length=64), nullable=False),
    sa.Column('accession_hash', sa.String(length=64), nullable=True),
    sa.Column('requested_by', sa.String(length=64), nullable=False),
    sa.Column('probabilities', sa.Text(), nullable=False),
    sa.Column('p_covid19', sa.Float(), nullable=False),
    sa.Column('operating_threshold', sa.Float(), nullable=False),
    sa.Column('decision', sa.String(length=40), nullable=False),
    sa.Column('ood_score', sa.Float(), nullable=True),
    sa.Column('warnings', sa.Text(), nullable=False),
    sa.Column('vitals_present', sa.Text(), nullable=False),
    sa.Column('view', sa.String(length=20), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_predictions_accession_hash'), 'predictions', ['accession_hash'], unique=False)
    op.create_index(op.f('ix_predictions_created_at'), 'predictions', ['created_at'], unique=False)
    op.create_index(op.f('ix_predictions_model_version'), 'predictions', ['model_version'], unique=False)
    op.create_index(op.f('ix_predictions_site'), 'predictions', ['site'], unique=False)
    op.create_table('users',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('full_name', sa.String(length=200), nullable=False),
    sa.Column('role', sa.String(length=40), nullable=False),
    sa.Column('password_hash', sa.String(length=300), nullable=False),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.Column('failed_logins', sa.Integer(), nullable=False),
    sa.Column('locked', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.String(length=40), nullable=False),
    sa.Column('created_by', sa.String(length=200), nullable=False),
    sa.Column('disabled_at', sa.String(length=40), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_users_name'), 'users', ['name'], unique=True)
    op.create_table('api_tokens',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('token_id', sa.String(length=16), nullable=False),
    sa.Column('token_sha256', sa.String(length=64), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('issued_at', sa.String(length=40), nullable=False),
    sa.Column('issued_by', sa.String(length=200), nullable=False),
    sa.Column('expires_at', sa.String(length=40), nullable=True),
    sa.Column('revoked_at', sa.String(length=40), nullable=True),
    sa.Column('revoked_by', sa.String(length=200), nullable=True),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_api_tokens_token_id'), 'api_tokens', ['token_id'], unique=True)
    op.create_index(op.f('ix_api_tokens_token_sha256'), 'api_tokens', ['token_sha256'], unique=True)
    op.create_table('outcomes',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('prediction_id', sa.String(length=36), nullable=False),
    sa.Column('confirmed_class', sa.String(length=40), nullable=True),
    sa.Column('rtpcr_result', sa.String(length=20), nullable=True),
    sa.Column('truth_positive', sa.Boolean(), nullable=False),
    sa.Column('recorded_by', sa.String(length=64), nullable=False),
    sa.Column('recorded_at', sa.String(length=40), nullable=False),
    sa.Column('supersedes_id', sa.Integer(), nullable=True),
    sa.Column('correction_reason', sa.Text(), nullable=True),
    sa.Column('signed_by', sa.String(length=200), nullable=True),
    sa.Column('signature_meaning', sa.String(length=100), nullable=True),
    sa.ForeignKeyConstraint(['prediction_id'], ['predictions.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_outcomes_prediction_id'), 'outcomes', ['prediction_id'], unique=False)


def create_e_signatures() -> None:
    op.create_table('e_signatures',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('model', sa.String(length=200), nullable=False),
    sa.Column('version', sa.String(length=20), nullable=False),
    sa.Column('action', sa.String(length=20), nullable=False),
    sa.Column('meaning', sa.String(length=200), nullable=False),
    sa.Column('signer_name', sa.String(length=64), nullable=False),
    sa.Column('signer_full_name', sa.String(length=200), nullable=False),
    sa.Column('signer_role', sa.String(length=40), nullable=False),
    sa.Column('time_utc', sa.String(length=40), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('policy_version', sa.String(length=40), nullable=True),
    sa.Column('policy_passed', sa.Boolean(), nullable=True),
    sa.Column('policy_override_reason', sa.Text(), nullable=True),
    sa.Column('evaluation_sha256', sa.String(length=64), nullable=True),
    sa.Column('from_version', sa.String(length=20), nullable=True),
    sa.Column('signature_sha256', sa.String(length=64), nullable=False),
    sa.Column('audit_seq', sa.Integer(), nullable=False),
    sa.Column('audit_entry_hash', sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_e_signatures_version'), 'e_signatures', ['version'], unique=False)


def downgrade() -> None:
    for table in ("outcomes", "api_tokens", "e_signatures", "users", "predictions", "audit_trail"):
        op.drop_table(table)
