"""A client of a schema registry's Confluent-compatible REST API: Confluent Schema Registry,
Apicurio Registry (``/apis/ccompat/v7``), Karapace. The Avro output format registers the result
schema with it at start-up, and readers find a message's writer schema by the id in its first
bytes. Only the standard library: four calls do not need a dependency.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request

COMPATIBILITY_LEVELS = ("BACKWARD", "BACKWARD_TRANSITIVE", "FORWARD", "FORWARD_TRANSITIVE", "FULL",
                        "FULL_TRANSITIVE", "NONE")
_MEDIA_TYPE = "application/vnd.schemaregistry.v1+json"


class RegistryUnavailable(RuntimeError):
    """The registry did not answer (refused, timed out, 5xx): retry later, never blame the message."""


class RegistryRefused(ValueError):
    """The registry answered no (``status``: 404 unknown schema, 409 incompatible, 422 invalid)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class SchemaRegistry:
    """``url``: the API's base, e.g. ``http://registry:8080/apis/ccompat/v7`` for Apicurio.

    Schemas fetched by id are cached for the process: an id always names the same schema."""

    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._schemas: dict[int, str] = {}

    def register(self, subject: str, schema: str) -> int:
        """The id of ``schema`` (Avro JSON text) under ``subject``: a new version unless the same
        schema is there already; RegistryRefused (409) when the subject's compatibility rule forbids it."""
        answer = self._call("POST", f"/subjects/{_quote(subject)}/versions", {"schema": schema, "schemaType": "AVRO"})
        schema_id = int(answer["id"])
        self._schemas.setdefault(schema_id, schema)  # our own records decode without asking again
        return schema_id

    def set_compatibility(self, subject: str, level: str) -> None:
        self._call("PUT", f"/config/{_quote(subject)}", {"compatibility": level})

    def compatibility(self, subject: str) -> str | None:
        """The subject's own compatibility level, ``None`` where it has none (the global one applies)."""
        try:
            answer = self._call("GET", f"/config/{_quote(subject)}")
        except RegistryRefused as exc:
            if exc.status == 404:
                return None
            raise
        return answer.get("compatibilityLevel") or answer.get("compatibility")

    def schema(self, schema_id: int) -> str:
        """The schema text registered as ``schema_id``; RegistryRefused (404) for an unknown id."""
        if schema_id not in self._schemas:
            self._schemas[schema_id] = self._call("GET", f"/schemas/ids/{schema_id}")["schema"]
        return self._schemas[schema_id]

    def wait_until_reachable(self, timeout_s: float) -> None:
        """Block until the registry answers (a worker may start before it), else RegistryUnavailable."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._call("GET", "/subjects")
                return
            except RegistryUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        where = f"{method} {self.url}{path}"
        request = urllib.request.Request(
            self.url + path, method=method, data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": _MEDIA_TYPE, "Accept": f"{_MEDIA_TYPE}, application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            message = _error_message(exc)
            if exc.code >= 500:
                raise RegistryUnavailable(f"schema registry {where}: HTTP {exc.code}: {message}") from None
            raise RegistryRefused(exc.code, f"schema registry {where}: HTTP {exc.code}: {message}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RegistryUnavailable(f"schema registry unreachable ({where}): {reason}") from None


def _quote(subject: str) -> str:
    return urllib.parse.quote(subject, safe="")


def _error_message(exc: urllib.error.HTTPError) -> str:
    """The registry's ``message`` (``{"error_code": 409, "message": ...}``), else the body's start."""
    body = exc.read()[:2000].decode("utf-8", "replace")
    try:
        return str(json.loads(body).get("message", body))
    except (ValueError, AttributeError):
        return body or exc.reason
