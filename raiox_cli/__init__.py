"""raiox: identify the dental implant system in a radiograph."""

__version__ = "0.1.0"

# Before anything else loads: no dependency reports usage unless the operator opts in.
from raiox_cli.lifecycle import keep_telemetry_off

keep_telemetry_off()
