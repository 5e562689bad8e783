"""The data layer: every SQL statement raiox runs, one intent-named function each.

Values are always bound parameters. The only composed SQL is what PostgreSQL
cannot take as a parameter (a vector's dimension, an index name, the literal a
partial index is matched on); those come from `models` rows, never from input.

The package is split by concern; every public name is re-exported here, so callers
write `queries.upsert_implant(...)` whichever module owns it. A new concern gets its
own module and a line below; SQL never lives outside this package.
"""

from raiox_cli.db.queries.analyses import *  # noqa: F403
from raiox_cli.db.queries.auth import *  # noqa: F403
from raiox_cli.db.queries.backup import *  # noqa: F403
from raiox_cli.db.queries.batch import *  # noqa: F403
from raiox_cli.db.queries.calibration import *  # noqa: F403
from raiox_cli.db.queries.catalogue import *  # noqa: F403
from raiox_cli.db.queries.clinics import *  # noqa: F403
from raiox_cli.db.queries.feedback import *  # noqa: F403
from raiox_cli.db.queries.models import *  # noqa: F403
from raiox_cli.db.queries.nearest import *  # noqa: F403
from raiox_cli.db.queries.notifications import *  # noqa: F403
from raiox_cli.db.queries.ops import *  # noqa: F403
from raiox_cli.db.queries.schema import *  # noqa: F403
from raiox_cli.db.queries.server import *  # noqa: F403
from raiox_cli.db.queries.training import *  # noqa: F403
