"""Requests without a valid key are rate limited per client address (issue 15): every 401 spends the
address's token bucket, and once it is empty the address gets 429 with Retry-After before any key it
sends is looked up, so guessing keys is bounded; another address, and a key already known valid, are not
affected. The app in process on SQLite and PostgreSQL, its buckets in the database as in production."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tuneforge.api.app import create_app
from tuneforge.db import tenants as tenant_rows
from tuneforge.db.migrate import upgrade
from tuneforge.db.session import Database
from tuneforge.db.tenants import generate_secret
from tuneforge.settings import Settings

BURST = 4


@pytest.fixture
def app(database_url, tmp_path):
    db = Database(database_url)
    upgrade(db.engine)
    with db.session() as session:
        _, secret = tenant_rows.create_api_key(session, tenant_id="tenant-a")
    settings = Settings.from_env(database_url=database_url, artifacts_dir=tmp_path / "artifacts",
                                 unauthenticated_rate_limit_per_minute=6, unauthenticated_rate_limit_burst=BURST)
    app = create_app(settings, db=db)
    app.state.secret = secret
    yield app
    db.dispose()


def test_guessing_keys_from_one_address_is_bounded_and_other_callers_are_not(app):
    guesser = TestClient(app, client=("203.0.113.7", 40000))
    valid = {"Authorization": f"Bearer {app.state.secret}"}
    assert guesser.get("/v1/files", headers=valid).status_code == 200  # now known valid in this process

    answers = [guesser.get("/v1/files", headers={"Authorization": f"Bearer {generate_secret()}"})
               for _ in range(BURST + 3)]
    statuses = [r.status_code for r in answers]
    # One token per 10 s: however slow this machine, the burst is all the guesses get.
    assert statuses == [401] * BURST + [429] * 3, statuses
    refused = answers[-1]
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["Retry-After"]) <= 10
    # A missing key is limited the same way, and the right key guessed now gets 429, not a 200 that says so.
    assert guesser.get("/v1/models").status_code == 429
    fresh = create_app(app.state.settings, db=app.state.db)  # another API process: it has not seen the key
    assert TestClient(fresh, client=("203.0.113.7", 40001)).get("/v1/files", headers=valid).status_code == 429

    # The key this process already knows keeps working from the guesser's address; other addresses are free.
    assert guesser.get("/v1/files", headers=valid).status_code == 200
    other = TestClient(app, client=("198.51.100.9", 40000))
    assert other.get("/v1/files", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert other.get("/health").status_code == 200 and guesser.get("/health").status_code == 200
