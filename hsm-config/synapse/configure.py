"""Writes a Synapse config for mxhsm's tests: loopback only, SQLite, no federation, open
registration, rate limits off (reference/synapse.md). Run with the venv's python:

    python configure.py DATA_DIR PORT
"""
import subprocess
import sys
from pathlib import Path

import yaml

data = Path(sys.argv[1]).resolve()
port = int(sys.argv[2])
data.mkdir(parents=True, exist_ok=True)
conf = data / "homeserver.yaml"
subprocess.run(
    [sys.executable, "-m", "synapse.app.homeserver", "--generate-config",
     "--server-name", "localhost", "--config-path", str(conf),
     "--data-directory", str(data), "--report-stats=no"],
    check=True, stdout=subprocess.DEVNULL,
)
c = yaml.safe_load(conf.read_text())
off = {"per_second": 100000, "burst_count": 100000}
c.update({
    "listeners": [{"port": port, "bind_addresses": ["127.0.0.1"], "type": "http", "tls": False,
                   "x_forwarded": False, "resources": [{"names": ["client"], "compress": False}]}],
    "database": {"name": "sqlite3", "args": {"database": str(data / "homeserver.db")}},
    "public_baseurl": f"http://127.0.0.1:{port}/",
    "enable_registration": True,
    "enable_registration_without_verification": True,
    "password_config": {"enabled": True},
    "bcrypt_rounds": 4,
    "trusted_key_servers": [],
    "suppress_key_server_warning": True,
    "federation_domain_whitelist": [],
    "report_stats": False,
    "enable_metrics": False,
    "url_preview_enabled": False,
    "presence": {"enabled": False},
    "rc_message": off, "rc_registration": off,
    "rc_login": {"address": off, "account": off, "failed_attempts": off},
    "rc_admin_redaction": off, "rc_joins": {"local": off, "remote": off},
    "rc_joins_per_room": off, "rc_3pid_validation": off,
    "rc_invites": {"per_room": off, "per_user": off, "per_issuer": off},
    "rc_third_party_invite": off, "rc_key_requests": off, "rc_media_create": off,
    "rc_presence": {"per_user": off}, "rc_delayed_event_mgmt": off, "rc_room_creation": off,
    "rc_reports": off, "rc_user_directory": off, "rc_profile": off,
})
conf.write_text(yaml.safe_dump(c))
log_config = Path(c["log_config"])
log_config.write_text(yaml.safe_dump({
    "version": 1,
    "formatters": {"precise": {"format": "%(asctime)s - %(name)s - %(levelname)s - %(message)s"}},
    "handlers": {"file": {"class": "logging.FileHandler", "formatter": "precise",
                          "filename": str(data / "homeserver.log")}},
    "root": {"level": "WARNING", "handlers": ["file"]},
    "disable_existing_loggers": False,
}))
