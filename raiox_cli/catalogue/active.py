"""The model the catalogue searches with, followed when nothing is configured.

After `raiox adapt --apply` (or `raiox reindex --model M --weights FILE`) the
catalogue's model was loaded from a local file, recorded with the model (path and
sha256). Search, the server and cron then need no RAIOX_MODEL/RAIOX_WEIGHTS: when
none of --model/--pretrained/--weights and their variables is set, they load that
file, and refuse with the reason when it went missing or changed.
"""

from __future__ import annotations

from pathlib import Path

from raiox_cli import db
from raiox_cli.config import Settings
from raiox_cli.db import queries
from raiox_cli.embedding import checkpoints
from raiox_cli.errors import DatabaseUnavailable, ModelUnavailable, SchemaError


def follow_recorded_weights(settings: Settings) -> Settings:
    """`settings` set to load the catalogue's recorded weights file, if it has one;
    unchanged otherwise (no schema yet: the command says what to do)."""
    try:
        with db.connect(settings) as conn:
            db.check_schema(conn)
            recorded = queries.active_model_weights(conn)
    except (DatabaseUnavailable, SchemaError):
        return settings  # the command itself says what is wrong, as before
    if recorded is None:
        return settings
    path = Path(recorded.path)
    fixes = (
        "set RAIOX_MODEL and RAIOX_WEIGHTS to the file the catalogue was built with, or "
        'switch models with "raiox reindex --model NAME --weights FILE"'
    )
    if not path.is_file():
        raise ModelUnavailable(
            f"the catalogue's model {recorded.model_id} loads {path} (recorded by raiox adapt "
            f"--apply or reindex --weights), which is missing; put it back, or {fixes}"
        )
    found = checkpoints.file_sha256(path)
    if found != recorded.sha256:
        raise ModelUnavailable(
            f"the catalogue's model {recorded.model_id} loads {path}, which changed since it "
            f"was recorded (sha256 {recorded.sha256[:16]}, now {found[:16]}); put the "
            f"original back, or {fixes}"
        )
    name = recorded.model_id.partition(":")[0]
    return settings.replace(model=name, pretrained="file", weights=path)
