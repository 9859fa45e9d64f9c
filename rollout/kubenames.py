"""Kubernetes object names: the DNS-1123 rules, and what the kubernetes state store calls things.

Pure and import-free, so the spec's validation (`rollout.config`, which the pure core reads) can
say at `name` and `state.namespace` what the API server would refuse later, without depending
on the state store package.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Sequence

#: Namespaces (and each dot-separated part of an object name) are DNS-1123 labels.
DNS_1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
#: ConfigMap and Lease names are DNS-1123 subdomains (and at most 253 characters).
DNS_1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
SUBDOMAIN_MAX = 253

#: An app name: it names Services (`<app>-green-pinned`), which are DNS-1035 labels (a letter
#: first), so at most 50 characters, as "-green-pinned" is appended.
APP_NAME = re.compile(r"[a-z]([-a-z0-9]{0,48}[a-z0-9])?")

#: A label value: at most 63 letters, digits, '-', '_' and '.', starting and ending with a
#: letter or digit (the empty value aside, which nothing here wants).
LABEL_VALUE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")

#: Every rollout's name is at most this long, whatever its store: the file store's longest file
#: name, `.<name>.status.<pid>.tmp`, must fit 255 bytes (`run` failed at the lease with "File
#: name too long" after `validate` said ok). The kubernetes store's objects would allow 232.
ROLLOUT_NAME_MAX = 200

#: The state store's objects: Lease `aml-rollout-<name>`, ConfigMaps `aml-rollout-<name>-status`
#: and `aml-rollout-<name>-commands`.
PREFIX = "aml-rollout-"
STATUS_SUFFIX = "-status"
COMMANDS_SUFFIX = "-commands"


def namespace_problem(namespace: str) -> str | None:
    """Why `namespace` is no namespace name, or None."""
    if DNS_1123_LABEL.fullmatch(namespace):
        return None
    return (
        f"{namespace!r} is not a Kubernetes namespace name (a DNS-1123 label: at most 63 "
        "lower-case letters, digits and '-', starting and ending with a letter or digit)"
    )


def app_problem(app: str) -> str | None:
    """Why `app` cannot name the istio router's Services (`<app>-blue`, ...), or None."""
    if APP_NAME.fullmatch(app):
        return None
    if not app[:1].isalpha():
        return (
            f"{app!r} must start with a letter (Services are named after it, e.g. {app}-blue, "
            "and Service names are DNS-1035 labels)"
        )
    return (
        f"{app!r} is not a DNS-1035 label (a lower-case letter, then lower-case letters, digits "
        "and '-', not ending in '-', at most 50 characters)"
    )


def label_value_problem(value: str) -> str | None:
    """Why `value` is no label value (e.g. the ingress gateway's `istio:` label), or None."""
    if LABEL_VALUE.fullmatch(value):
        return None
    return (
        f"{value!r} is not a label value (at most 63 letters, digits, '-', '_' and '.', "
        "starting and ending with a letter or digit)"
    )


#: The longest host name Istio takes (pilot's DNS-1123 preconditions).
HOST_MAX = 255


def host_problem(host: str) -> str | None:
    """Why `host` cannot be a host of the Gateway and the VirtualService, or None.

    The router's `hosts` go to both, so a host meets Istio's validating webhook for both
    (pilot's ValidateWildcardDomain; for a Gateway server's hosts without a namespace,
    validateSidecarOrGatewayHostnamePart): `*` alone (any host: a VirtualService bound to a
    Gateway only, as ours is, may have it), an IPv4 address (an IPv6 one has no dot: the
    Gateway refuses it as a short name), or at most 255 characters of DNS-1123 labels with a
    dot among them (a Gateway refuses short names), the first of which may be `*` whole (a
    Gateway refuses a partial wildcard, `*foo`), the last not all digits.
    Lower case too, which Istio does not ask: it hands a host to Envoy as written, and
    mixed-case hosts have matched no request and had a route configuration refused
    (istio/istio#50118, #49638).
    """
    why = _host_why(host)
    if why is None:
        return None
    return (
        f"{host!r} is not a host name Istio takes: {why} (e.g. diabetes.example.com, "
        "*.example.com, or * for any)"
    )


def _host_why(host: str) -> str | None:
    if host == "*":
        return None
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).version == 4:
            return None
        # Istio's short-name rule comes before its waiver for IPs: no dot, refused.
        return "an IPv6 address: the Gateway takes names with a dot (or an IPv4 address) only"
    for part, why in (("://", "no scheme"), ("/", "no path"), (":", "no port")):
        if part in host:
            return why
    if not host or len(host) > HOST_MAX:
        return f"{len(host)} characters, not 1 to at most {HOST_MAX}"
    if host != host.lower():
        return "lower case only (mixed case goes to Envoy as it is, and matches no request)"
    first, dot, rest = host.partition(".")
    if not dot:
        return "a short name (no dot): the Gateway takes fully qualified names only"
    if first != "*" and "*" in first:
        return f"a partial wildcard ({first!r}): the Gateway takes `*` whole only"
    if "*" in rest:
        return "`*` only as the whole first label (*.example.com)"
    labels = rest.split(".")
    if len(labels) > 1 and not labels[-1]:
        labels.pop()  # a trailing dot: `example.com.`, a name no search domain extends
    for label in [first, *labels] if first != "*" else labels:
        if not DNS_1123_LABEL.fullmatch(label):
            return (
                f"label {label!r} is no DNS-1123 label (1 to 63 lower-case letters, digits "
                "and '-', starting and ending with a letter or digit)"
            )
    if labels[-1].isdigit():
        return f"its top-level domain {labels[-1]!r} is all digits"
    return None


def hosts_problem(hosts: Sequence[str]) -> str | None:
    """Why `hosts` cannot be the Gateway's and the VirtualService's hosts, or None."""
    if not hosts:
        return "needs at least one host (`*`: any)"
    return next((p for host in hosts if (p := host_problem(host)) is not None), None)


def rollout_name_problem(name: str) -> str | None:
    """Why rollout `name` cannot name the state store's objects, or None when it can."""
    longest = f"{PREFIX}{name}{COMMANDS_SUFFIX}"
    if DNS_1123_SUBDOMAIN.fullmatch(longest) and len(name) <= ROLLOUT_NAME_MAX:
        return None
    # The ConfigMap's own limit leaves more room, but no rollout name is longer than this.
    room = min(SUBDOMAIN_MAX - len(PREFIX) - len(COMMANDS_SUFFIX), ROLLOUT_NAME_MAX)
    return (
        f"{name!r} cannot name Kubernetes objects (with state.kind kubernetes the rollout lives "
        f"in ConfigMap {PREFIX}{name}{STATUS_SUFFIX}): use lower-case letters, digits, '-' and "
        f"'.' only (no '_', no '.' next to '-' or '.'), at most {room} characters"
    )


def secret_name_problem(name: str) -> str | None:
    """Why `name` cannot name a Secret, or None (Secret names are DNS-1123 subdomains)."""
    if len(name) <= SUBDOMAIN_MAX and DNS_1123_SUBDOMAIN.fullmatch(name):
        return None
    return (
        f"{name!r} is not a Secret name (a DNS-1123 subdomain: at most {SUBDOMAIN_MAX} "
        "lower-case letters, digits, '-' and '.', starting and ending with a letter or digit)"
    )


#: A key of a Secret's data (Kubernetes' IsConfigMapKey): letters, digits, '-', '_' and '.'.
_SECRET_KEY = re.compile(r"[-._a-zA-Z0-9]+")


def secret_key_problem(key: str) -> str | None:
    """Why `key` cannot be a key of a Secret, or None (the API server's rule for the key a
    `secretKeyRef` names: it is a file name when the Secret is mounted, so no '.' or '..')."""
    fits = len(key) <= SUBDOMAIN_MAX and _SECRET_KEY.fullmatch(key) is not None
    if fits and key != "." and not key.startswith(".."):
        return None
    return (
        f"{key!r} is not a key of a Secret (at most {SUBDOMAIN_MAX} letters, digits, '-', '_' "
        "and '.', not '.' and not starting with '..')"
    )
