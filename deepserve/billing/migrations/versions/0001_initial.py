"""billing tables: accounts, keys, prices, instances, reservations, usage, ledger, rate buckets, idempotency

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-26 12:11:35.053830

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0001'
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('accounts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('balance', sa.BigInteger(), nullable=False),
    sa.Column('reserved', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.CheckConstraint('balance - reserved >= 0', name=op.f('ck_accounts_never_overspent')),
    sa.CheckConstraint('reserved >= 0', name=op.f('ck_accounts_reserved_not_negative')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_accounts')),
    sa.UniqueConstraint('name', name=op.f('uq_accounts_name'))
    )
    op.create_table('idempotency',
    sa.Column('scope', sa.String(length=64), nullable=False),
    sa.Column('key', sa.String(length=255), nullable=False),
    sa.Column('fingerprint', sa.String(length=64), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('instance_id', sa.String(length=36), nullable=False),
    sa.Column('status_code', sa.Integer(), nullable=True),
    sa.Column('headers', sa.Text(), nullable=True),
    sa.Column('body', sa.LargeBinary(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('scope', 'key', name=op.f('pk_idempotency'))
    )
    with op.batch_alter_table('idempotency', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_idempotency_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_idempotency_instance_id'), ['instance_id'], unique=False)

    op.create_table('instances',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('machine', sa.String(length=300), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=False),
    sa.Column('heartbeat_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_instances'))
    )
    op.create_table('prices',
    sa.Column('model_id', sa.String(length=200), nullable=False),
    sa.Column('input', sa.BigInteger(), nullable=False),
    sa.Column('cached_input', sa.BigInteger(), nullable=False),
    sa.Column('output', sa.BigInteger(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.CheckConstraint('input >= 0 AND cached_input >= 0 AND output >= 0', name=op.f('ck_prices_not_negative')),
    sa.PrimaryKeyConstraint('model_id', name=op.f('pk_prices'))
    )
    op.create_table('api_keys',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('account_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=True),
    sa.Column('prefix', sa.String(length=16), nullable=False),
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('expires_at', sa.DateTime(), nullable=True),
    sa.Column('revoked_at', sa.DateTime(), nullable=True),
    sa.Column('allowed_models', sa.Text(), nullable=True),
    sa.Column('rpm_limit', sa.Integer(), nullable=True),
    sa.Column('tpm_limit', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_api_keys_account_id_accounts')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_keys')),
    sa.UniqueConstraint('key_hash', name=op.f('uq_api_keys_key_hash'))
    )
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_api_keys_account_id'), ['account_id'], unique=False)

    op.create_table('rate_buckets',
    sa.Column('key_id', sa.Integer(), nullable=False),
    sa.Column('request_level', sa.BigInteger(), nullable=False),
    sa.Column('token_level', sa.BigInteger(), nullable=False),
    sa.Column('updated_ms', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['key_id'], ['api_keys.id'], name=op.f('fk_rate_buckets_key_id_api_keys')),
    sa.PrimaryKeyConstraint('key_id', name=op.f('pk_rate_buckets'))
    )
    op.create_table('reservations',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('account_id', sa.Integer(), nullable=False),
    sa.Column('key_id', sa.Integer(), nullable=True),
    sa.Column('instance_id', sa.String(length=36), nullable=False),
    sa.Column('model_id', sa.String(length=200), nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_reservations_account_id_accounts')),
    sa.ForeignKeyConstraint(['key_id'], ['api_keys.id'], name=op.f('fk_reservations_key_id_api_keys')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_reservations'))
    )
    with op.batch_alter_table('reservations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_reservations_account_id'), ['account_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_reservations_instance_id'), ['instance_id'], unique=False)

    op.create_table('usage_records',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('request_id', sa.String(length=36), nullable=False),
    sa.Column('account_id', sa.Integer(), nullable=False),
    sa.Column('key_id', sa.Integer(), nullable=True),
    sa.Column('model_id', sa.String(length=200), nullable=False),
    sa.Column('endpoint', sa.String(length=300), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('num_prompt_tokens', sa.Integer(), nullable=False),
    sa.Column('num_cached_tokens', sa.Integer(), nullable=False),
    sa.Column('num_completion_tokens', sa.Integer(), nullable=False),
    sa.Column('num_reasoning_tokens', sa.Integer(), nullable=False),
    sa.Column('cost', sa.BigInteger(), nullable=False),
    sa.Column('reserved', sa.BigInteger(), nullable=False),
    sa.Column('day', sa.String(length=10), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_usage_records_account_id_accounts')),
    sa.ForeignKeyConstraint(['key_id'], ['api_keys.id'], name=op.f('fk_usage_records_key_id_api_keys')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_usage_records')),
    sa.UniqueConstraint('request_id', name=op.f('uq_usage_records_request_id'))
    )
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_usage_records_account_id'), ['account_id'], unique=False)
        batch_op.create_index('ix_usage_records_day_key_model', ['day', 'key_id', 'model_id'], unique=False)

    op.create_table('ledger',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('account_id', sa.Integer(), nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('usage_id', sa.Integer(), nullable=True),
    sa.Column('note', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_ledger_account_id_accounts')),
    sa.ForeignKeyConstraint(['usage_id'], ['usage_records.id'], name=op.f('fk_ledger_usage_id_usage_records')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_ledger')),
    sa.UniqueConstraint('usage_id', name=op.f('uq_ledger_usage_id'))
    )
    with op.batch_alter_table('ledger', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_ledger_account_id'), ['account_id'], unique=False)



def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('ledger', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_ledger_account_id'))

    op.drop_table('ledger')
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.drop_index('ix_usage_records_day_key_model')
        batch_op.drop_index(batch_op.f('ix_usage_records_account_id'))

    op.drop_table('usage_records')
    with op.batch_alter_table('reservations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_reservations_instance_id'))
        batch_op.drop_index(batch_op.f('ix_reservations_account_id'))

    op.drop_table('reservations')
    op.drop_table('rate_buckets')
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_api_keys_account_id'))

    op.drop_table('api_keys')
    op.drop_table('prices')
    op.drop_table('instances')
    with op.batch_alter_table('idempotency', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_idempotency_instance_id'))
        batch_op.drop_index(batch_op.f('ix_idempotency_created_at'))

    op.drop_table('idempotency')
    op.drop_table('accounts')
