"""S3 for the checkpoint store: one connection setting for pyarrow and boto3, one-line diagnoses of
S3 failures, and the lease lock that lets processes on any machine share one store.

Configuration is the standard one only: ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``),
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION`` /
``AWS_DEFAULT_REGION``, or pyarrow's URI form
``s3://[KEY:SECRET@]bucket/prefix?endpoint_override=HOST:PORT&scheme=http&region=R``. The URI wins
over the environment, and both clients get the same endpoint and credentials.

boto3 is needed for the lease only (conditional puts, which pyarrow does not expose); it is
imported when a lock is first taken.
"""
from __future__ import annotations

import email.utils
import json
import logging
import os
import random
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, unquote, urlsplit

import pyarrow.fs as pafs

log = logging.getLogger(__name__)

# A dead endpoint must fail in seconds, not after the SDK's minutes of retries.
CONNECT_TIMEOUT_S = 3.0
REQUEST_TIMEOUT_S = 20.0
MAX_ATTEMPTS = 3
DEFAULT_LEASE_TTL_S = 30.0

URI_OPTIONS = ("endpoint_override", "scheme", "region", "access_key", "secret_key", "session_token",
               "force_virtual_addressing", "tls_ca_file_path")
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
DENIED = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
          "ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "EXPIRED_TOKEN")
CONTENDED = ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey")


class S3SetupError(ValueError):
    """The URI or the endpoint cannot serve as a store (an unknown option, a bad bucket name, no
    conditional writes): the store reports it in one line."""


@dataclass
class S3Location:
    """Where an ``s3://`` store lives and how to reach it; builds both clients from one setting."""

    bucket: str
    prefix: str
    endpoint: str | None = None  # host[:port]; None = AWS itself
    scheme: str = "https"
    region: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    session_token: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    _client: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        parts = urlsplit(uri)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        unknown = sorted(set(query) - set(URI_OPTIONS))
        if unknown:
            raise S3SetupError(f"unknown URI option {unknown[0]!r} (known: {', '.join(URI_OPTIONS)})")
        bucket = parts.netloc.rpartition("@")[2]
        if not BUCKET_RE.match(bucket):
            raise S3SetupError(f"invalid bucket name {bucket!r} (3-63 lowercase letters, digits, '.', '-')")
        endpoint, scheme = query.get("endpoint_override"), query.get("scheme")
        if endpoint is None:  # the standard variables, as boto3 and the AWS CLI read them
            env = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            if env:
                url = urlsplit(env if "://" in env else f"https://{env}")
                endpoint, scheme = url.netloc, scheme or url.scheme
        extra = {}
        if "force_virtual_addressing" in query:
            extra["force_virtual_addressing"] = query["force_virtual_addressing"].lower() in ("1", "true", "yes")
        if "tls_ca_file_path" in query:
            extra["tls_ca_file_path"] = query["tls_ca_file_path"]
        return cls(bucket=bucket, prefix=parts.path.strip("/"), endpoint=endpoint, scheme=scheme or "https",
                   region=query.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
                   access_key=query.get("access_key") or (unquote(parts.username) if parts.username else None),
                   secret_key=query.get("secret_key") or (unquote(parts.password) if parts.password else None),
                   session_token=query.get("session_token"), extra=extra)

    def __getstate__(self):  # boto3 clients do not pickle; the copy builds its own
        return {**self.__dict__, "_client": None}

    @property
    def display(self) -> str:
        """The URI without options or credentials, for messages."""
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    @property
    def endpoint_url(self) -> str:
        return f"{self.scheme}://{self.endpoint}" if self.endpoint else f"https://s3.{self.region or 'us-east-1'}.amazonaws.com"

    def key(self, relative: str) -> str:
        """The object key of ``relative`` (a path under the store's prefix)."""
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def filesystem(self) -> pafs.S3FileSystem:
        """pyarrow's S3 filesystem with bounded timeouts and retries (no network call here).
        ``allow_delayed_open``: an object smaller than a part is written with one PutObject at
        close, instead of a multipart upload (3 requests) that a killed writer would leave open."""
        if self.region is None and self.endpoint is None:  # AWS itself: ask where the bucket is
            self.region = pafs.resolve_s3_region(self.bucket)
        return pafs.S3FileSystem(
            access_key=self.access_key, secret_key=self.secret_key, session_token=self.session_token,
            region=self.region, endpoint_override=self.endpoint, scheme=self.scheme,
            connect_timeout=CONNECT_TIMEOUT_S, request_timeout=REQUEST_TIMEOUT_S,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS), allow_delayed_open=True,
            **self.extra)

    def client(self):
        """A boto3 S3 client on the same endpoint, with the same credentials and bounds."""
        if self._client is None:
            import boto3  # optional: the [cluster] extra
            from botocore.config import Config

            cfg = Config(connect_timeout=CONNECT_TIMEOUT_S, read_timeout=REQUEST_TIMEOUT_S,
                         retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS},
                         s3={"addressing_style": "virtual" if self.extra.get("force_virtual_addressing")
                             else ("path" if self.endpoint else "auto")})
            # A session of its own: boto3's default one keeps the credentials it first found, while
            # pyarrow reads the environment when the store is opened.
            self._client = boto3.session.Session().client(
                "s3", endpoint_url=self.endpoint_url if self.endpoint else None, region_name=self.region or "us-east-1",
                aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
                aws_session_token=self.session_token, verify=self.extra.get("tls_ca_file_path"), config=cfg)
        return self._client

    def explain(self, e: BaseException) -> str:
        """One line saying what is wrong, for pyarrow's and boto3's errors alike."""
        text = str(e)
        code = _code(e)
        if isinstance(e, ModuleNotFoundError):
            return f"locking an S3 store needs boto3 (no module {e.name!r}): pip install 'ptmdd_ray[cluster]'"
        if "NETWORK_CONNECTION" in text or type(e).__name__ in (
                "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError"):
            return f"cannot reach the S3 endpoint {self.endpoint_url} ({_network_reason(e)})"
        if code == "NoSuchBucket" or "NO_SUCH_BUCKET" in text or re.search(r"[Bb]ucket '[^']*' not found", text):
            return f"bucket '{self.bucket}' does not exist"
        if code in DENIED or any(d in text for d in DENIED):
            return "access denied (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
        return (text.splitlines() or [type(e).__name__])[0]


def _response(e: BaseException) -> dict:
    r = getattr(e, "response", None)  # botocore's ClientError carries the parsed reply
    return r if isinstance(r, dict) else {}


def _code(e: BaseException) -> str:
    return str(_response(e).get("Error", {}).get("Code", ""))


def _network_reason(e: BaseException) -> str:
    text = f"{e} {getattr(e, 'kwargs', {}).get('error', '')}".lower()
    if "curlcode: 7," in text or "refused" in text:
        return "connection refused"
    if "curlcode: 6," in text or "resolve" in text or "name or service" in text:
        return "host not found"
    if "curlcode: 28," in text or "timed out" in text or "timeout" in text:
        return "timed out"
    return "could not connect"


def contended(e: BaseException) -> bool:
    """A conditional write or delete lost to another writer (the lease changed or went away)."""
    return _code(e) in CONTENDED or str(_status(e)) in ("409", "412")


def _status(e: BaseException) -> int | None:
    return _response(e).get("ResponseMetadata", {}).get("HTTPStatusCode")


class _Seen(NamedTuple):
    """A lease as read back: its ETag, age on the server's clock (s), ttl, holder, holder's uuid."""

    etag: str
    age: float
    ttl: float
    holder: str
    id: str


class S3Lease:
    """An exclusive, expiring lock: the object ``<prefix>/locks/<name>.lease``.

    Taken with a conditional create (``If-None-Match: *``), so two contenders cannot both create
    it. Its body names the holder (host, pid, a uuid) and the ttl. A lease is expired when the S3
    server's own clock (the ``Date`` of its reply) is past its ``LastModified`` + ttl + 1 s (both
    have 1 s resolution), so client clocks do not matter; an expired lease is taken over with a
    compare-and-swap put (``If-Match`` its ETag), which one contender wins. While held, a daemon
    thread rewrites it every ttl/3 (``If-Match`` our ETag; the body changes, so does the ETag): a
    holder training for minutes keeps it, one SIGKILLed stops renewing and loses it after the ttl.
    Release deletes it ``If-Match`` our ETag, so it never deletes a successor's lease. A holder
    whose renewal finds the lease taken (it stalled past the ttl) logs an error and sets ``lost``.
    A conditional write refused because its own first try had landed (a reply lost, the client
    retried) is recognised by the uuid in the body, so it is not mistaken for contention.
    """

    def __init__(self, loc: S3Location, name: str, ttl: float = DEFAULT_LEASE_TTL_S):
        self.loc, self.name, self.ttl = loc, name, float(ttl)
        self.key = loc.key(f"locks/{name}.lease")
        self.id = uuid.uuid4().hex
        self.etag: str | None = None
        self.lost = False
        self._renewals = 0
        self._holder = "another process"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        self._renewals += 1  # a new body each write: a renewal must change the ETag
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "id": self.id, "ttl": self.ttl,
                           "renewal": self._renewals, "written": time.time()}).encode()

    def _put(self, **condition) -> str:
        r = self.loc.client().put_object(Bucket=self.loc.bucket, Key=self.key, Body=self._body(), **condition)
        return r["ETag"]

    def acquire(self, wait: bool = True) -> bool:
        """Take the lease; with ``wait=False`` return False at once when it is held elsewhere."""
        delay, announced = 0.05, False
        while not self._try_acquire():
            if not wait:
                return False
            if not announced:
                log.info("store lock %s is held by %s; waiting", self.name, self._holder)
                announced = True
            time.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 1.5, 1.0, self.ttl / 4)
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.name}", daemon=True)
        self._thread.start()
        return True

    def _try_acquire(self) -> bool:
        """One round: create the lease, or take over an expired one. False when held elsewhere."""
        if self._create():
            return True
        seen = self._current()
        if seen is None:  # released in between
            return self._create()
        if seen.id == self.id:  # our create landed, its reply did not
            self.etag = seen.etag
            return True
        self._holder = seen.holder
        if seen.age < seen.ttl + 1:
            return False
        try:
            self.etag = self._put(IfMatch=seen.etag)
        except Exception as e:
            if contended(e):
                return False  # another contender took it first, or its holder renewed just now
            raise
        log.warning("store lock %s: took over the expired lease of %s (%.0f s old, ttl %.0f s)",
                    self.name, seen.holder, seen.age, seen.ttl)
        return True

    def _create(self) -> bool:
        try:
            self.etag = self._put(IfNoneMatch="*")
            return True
        except Exception as e:
            if contended(e):
                return False
            raise

    def _current(self) -> _Seen | None:
        """The lease as it is now, or None if there is none."""
        try:
            r = self.loc.client().get_object(Bucket=self.loc.bucket, Key=self.key)
        except Exception as e:
            if _code(e) == "NoSuchKey" or _status(e) == 404:
                return None
            raise
        body = r["Body"].read()
        try:
            info = json.loads(body)
            ttl, holder, lease_id = float(info["ttl"]), f"{info['host']} pid {info['pid']}", str(info["id"])
        except (ValueError, KeyError, TypeError):  # not ours or damaged: judge it by our ttl
            ttl, holder, lease_id = self.ttl, "an unreadable lease", ""
        date = r["ResponseMetadata"]["HTTPHeaders"].get("date")
        now = email.utils.parsedate_to_datetime(date).timestamp() if date else time.time()
        return _Seen(r["ETag"], now - r["LastModified"].timestamp(), ttl, holder, lease_id)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.etag = self._put(IfMatch=self.etag)
            except Exception as e:
                if contended(e) and not self._still_ours():
                    self.lost = True
                    log.error("store lock %s was lost: the lease expired and was taken by another process "
                              "(this process stalled past its ttl of %.0f s)", self.name, self.ttl)
                    return
                log.warning("store lock %s: renewal failed (%s); retrying", self.name, self.loc.explain(e))

    def _still_ours(self) -> bool:
        """After a refused renewal: True (and our ETag updated) if the lease is ours after all."""
        try:
            seen = self._current()
        except Exception:  # unknown: the next renewal finds out
            return True
        if seen is not None and seen.id == self.id:
            self.etag = seen.etag
            return True
        return False

    def release(self) -> None:
        """Stop renewing and delete the lease, if it is still ours (a failure only logs: it expires)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost or self.etag is None:
            return
        try:
            self.loc.client().delete_object(Bucket=self.loc.bucket, Key=self.key, IfMatch=self.etag)
        except Exception as e:
            if _code(e) == "NoSuchKey" or _status(e) == 404:
                return  # gone already (a retried delete whose first try landed)
            if contended(e):
                self.lost = True
                log.error("store lock %s was lost before its release (taken by another process)", self.name)
            else:
                log.warning("store lock %s: release failed (%s); it expires in %.0f s",
                            self.name, self.loc.explain(e), self.ttl)


def check_conditional_writes(loc: S3Location) -> None:
    """Raise unless the endpoint refuses a second ``If-None-Match: *`` create of one key: an S3
    server that ignores the condition would let two holders take one lease. Leaves nothing."""
    client, key = loc.client(), loc.key(f"locks/.probe-{uuid.uuid4().hex}")
    etag = client.put_object(Bucket=loc.bucket, Key=key, Body=b"", IfNoneMatch="*")["ETag"]
    try:
        client.put_object(Bucket=loc.bucket, Key=key, Body=b"x", IfNoneMatch="*")
    except Exception as e:
        if not contended(e):
            raise
    else:
        client.delete_object(Bucket=loc.bucket, Key=key)
        raise S3SetupError(f"the S3 endpoint {loc.endpoint_url} ignores conditional writes "
                           "(If-None-Match), so store locks could not exclude each other")
    client.delete_object(Bucket=loc.bucket, Key=key, IfMatch=etag)
