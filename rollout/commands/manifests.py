"""`aml-rollout manifests`: render the Kubernetes/Istio bootstrap objects as YAML.

    aml-rollout manifests --namespace ml --app diabetes --green-package runs/package -o k8s.yaml
    kubectl apply -f k8s.yaml

The objects (Namespace, ServiceAccount, Role + RoleBinding with only what the Istio router uses,
the four Services and a DestinationRule for each, the Deployments given, the Gateway and the
VirtualService with green at 100 %)
come from `rollout.routers.istio_manifests`, the module the Istio router itself builds from, so
what is applied and what the router later patches are the same shapes. Settings come from a
rollout spec's istio `router` section (`--spec`) or from the options; options win.

`--api-key-secret NAME` gives both colours' scoring containers AML_ROLLOUT_API_KEY from that
Secret's key (`--api-key-secret-key`, `api-key`), so /score needs `Authorization: Bearer <key>`
while the probes' /healthz, /readyz and Prometheus' /metrics stay open (scoring.auth).

A colour's release is a package folder (`--green-package`, its package.json names model, version,
sha256 and image) or an image `<registry>/<model>:<version>` (`--green-image`). The command
imports only typer/stdlib at the top; pyyaml and the renderer load inside the command body.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from rollout.core.types import Release


def manifests(
    namespace: Annotated[
        str | None, typer.Option("--namespace", "-n", help="Namespace of every object (default).")
    ] = None,
    app: Annotated[
        str | None,
        typer.Option(help="Service name; objects are <app>-blue, <app>-gateway... (model)."),
    ] = None,
    spec: Annotated[
        Path | None,
        typer.Option(help="Take the settings from this rollout spec's istio router section."),
    ] = None,
    green_package: Annotated[
        Path | None, typer.Option(help="Package folder (package.json) green serves.")
    ] = None,
    green_image: Annotated[
        str | None, typer.Option(help="Image <registry>/<model>:<version> green serves.")
    ] = None,
    blue_package: Annotated[
        Path | None, typer.Option(help="Package folder blue serves (usually none at bootstrap).")
    ] = None,
    blue_image: Annotated[str | None, typer.Option(help="Image blue serves.")] = None,
    host: Annotated[
        list[str] | None, typer.Option(help="Host the Gateway accepts (repeat; default '*').")
    ] = None,
    header: Annotated[str | None, typer.Option(help="Pinning header (x-api-version).")] = None,
    port: Annotated[int | None, typer.Option(help="Service port (80).")] = None,
    container_port: Annotated[
        int | None, typer.Option(help="Scoring server port in the pod (8000).")
    ] = None,
    replicas: Annotated[int | None, typer.Option(help="Pods per colour (1).")] = None,
    ingress_gateway: Annotated[
        str | None,
        typer.Option(
            help="`istio:` label of the ingress gateway pods (ingressgateway; AKS's Istio "
            "add-on: aks-istio-ingressgateway-external)."
        ),
    ] = None,
    istio_revision: Annotated[
        str | None,
        typer.Option(
            help="Label the namespace istio.io/rev=REV, not istio-injection=enabled (AKS's "
            "Istio add-on: its revision, e.g. asm-1-23)."
        ),
    ] = None,
    api_key_secret: Annotated[
        str | None,
        typer.Option(
            help="Secret holding the scoring server's API key(s): both colours get it as "
            "AML_ROLLOUT_API_KEY, so /score needs `Authorization: Bearer <key>` (none: no auth)."
        ),
    ] = None,
    api_key_secret_key: Annotated[
        str | None, typer.Option(help="The key of --api-key-secret holding them (api-key).")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here instead of stdout.")
    ] = None,
) -> None:
    """Render the bootstrap objects as multi-document YAML for `kubectl apply -f`."""
    import yaml

    from rollout.core.types import Colour
    from rollout.errors import ConfigError, SettingError
    from rollout.routers import istio_manifests as m

    settings: dict[str, Any] = {}
    if spec is not None:
        from rollout.config import IstioRouterConfig, load_spec

        router = load_spec(spec).router
        if not isinstance(router, IstioRouterConfig):
            raise ConfigError(f"{spec}: router.kind is {router.kind!r}; manifests renders istio")
        settings = {
            "namespace": router.namespace,
            "app": router.app,
            "hosts": tuple(router.hosts),
            "header": router.header,
            "port": router.port,
            "container_port": router.container_port,
            "replicas": router.replicas,
            "ingress_selector": (("istio", router.ingress_gateway),),
            "api_key_secret": router.api_key_secret,
            "api_key_secret_key": router.api_key_secret_key,
        }
    options = {
        "namespace": namespace,
        "app": app,
        "hosts": tuple(host) if host else None,
        "header": header,
        "port": port,
        "container_port": container_port,
        "replicas": replicas,
        "ingress_selector": (("istio", ingress_gateway),) if ingress_gateway else None,
        "istio_revision": istio_revision,
        "api_key_secret": api_key_secret,
        "api_key_secret_key": api_key_secret_key,
    }
    if api_key_secret == "":
        # An unset shell variable (`--api-key-secret "$SECRET"`): no auth, while auth was asked.
        from rollout.kubenames import secret_name_problem

        raise ConfigError(f"--api-key-secret: {secret_name_problem('')}")
    if (
        api_key_secret_key is not None
        and api_key_secret is None
        and not settings.get("api_key_secret")
    ):
        # Without the Secret it would be dropped, and the service rendered without auth.
        raise ConfigError("--api-key-secret-key needs --api-key-secret (the Secret it is a key of)")
    if header is not None:
        from rollout.config import header_name

        try:
            options["header"] = header_name(header)
        except ValueError as exc:
            raise ConfigError(f"--header: {exc}") from None
    settings.update({k: v for k, v in options.items() if v is not None})
    settings.setdefault("namespace", "default")
    settings.setdefault("app", "model")
    try:
        layout = m.IstioLayout(**settings)
    except SettingError as exc:
        # The layout names spec fields; a value typed as an option is named by its option.
        key, flag = OPTION_OF.get(exc.setting, ("", ""))
        if options.get(key) is not None:
            raise ConfigError(f"{flag}: {exc.problem}") from None
        raise

    releases: dict[Colour, Release] = {}
    for colour, package, image in (
        (Colour.GREEN, green_package, green_image),
        (Colour.BLUE, blue_package, blue_image),
    ):
        if package is not None and image is not None:
            raise ConfigError(
                f"--{colour.value}-package and --{colour.value}-image exclude each other"
            )
        if package is not None:
            releases[colour] = release_from_package(package)
        elif image is not None:
            releases[colour] = release_from_image(image)

    class _NoAliases(yaml.SafeDumper):
        # A Deployment's selector and pod labels are one dict; written as `&id001` / `*id001`,
        # the file reads as a puzzle to whoever reviews it before `kubectl apply`.
        def ignore_aliases(self, data: Any) -> bool:
            return True

    def quoted(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
        # PyYAML quotes what its YAML 1.1 resolver reads as no string, not what kubectl's
        # (go-yaml) reads so: `1e3`, `0o17` (numbers), `y`, `N` (booleans) into an annotation,
        # a string field, fail the whole file.
        style = "'" if NOT_A_STRING.match(data) else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)

    _NoAliases.add_representer(str, quoted)
    text = f"# aml-rollout manifests: {layout.namespace}/{layout.app}\n" + yaml.dump_all(
        m.bootstrap(layout, releases), Dumper=_NoAliases, sort_keys=False, explicit_start=True
    )
    if output is None:
        typer.echo(text, nl=False)
    else:
        try:
            output.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"-o {output}: cannot write it: {exc.strerror or exc}") from exc
        typer.echo(f"wrote {output}", err=True)


#: Plain scalars some YAML parser reads as no string (beyond PyYAML's own YAML 1.1 resolver):
#: anything that starts like a number (YAML 1.2 floats `1e3`, Go's `0o17`, `0b1`), and go-yaml's
#: one-letter booleans. Quoting a string that needed none is harmless.
NOT_A_STRING = re.compile(r"[-+]?\.?[0-9]|[yYnN]$")

#: A layout setting (as `IstioLayout` names it) → its key in the options and the option itself.
OPTION_OF = {
    "router.namespace": ("namespace", "--namespace"),
    "router.app": ("app", "--app"),
    "router.hosts": ("hosts", "--host"),
    "router.port": ("port", "--port"),
    "router.container_port": ("container_port", "--container-port"),
    "router.replicas": ("replicas", "--replicas"),
    "router.ingress_gateway": ("ingress_selector", "--ingress-gateway"),
    "istio_revision": ("istio_revision", "--istio-revision"),
    "router.api_key_secret": ("api_key_secret", "--api-key-secret"),
    "router.api_key_secret_key": ("api_key_secret_key", "--api-key-secret-key"),
}


def release_from_image(image: str) -> Release:
    """The release an image `<registry>/<model>:<version>` holds (the package contract).

    A digest may follow the tag (`<registry>/<model>:<version>@sha256:...`, deployed as given);
    a digest alone names no version, so it is refused.
    """
    from rollout.core.types import Release
    from rollout.errors import ConfigError

    expected = "expected <registry>/<model>:<version> (optionally followed by @sha256:<digest>)"
    reference, _, digest = image.partition("@")
    if digest and ":" not in reference.rsplit("/", 1)[-1]:
        raise ConfigError(
            f"image {image!r}: a digest alone names no model version; {expected}, "
            "or use --<colour>-package"
        )
    path, _, version = reference.rpartition(":")
    if not path or "/" in version or not version or (digest and not digest.startswith("sha256:")):
        raise ConfigError(f"image {image!r}: {expected}")
    return Release(model=path.rsplit("/", 1)[-1], version=version, image=image)


def release_from_package(folder: Path) -> Release:
    """The release a package folder describes (its package.json, written by `package`)."""
    from rollout.core.types import Release
    from rollout.errors import ConfigError

    path = folder / "package.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Release(
            model=str(data["model"]),
            version=str(data["version"]),
            sha256=str(data.get("sha256", "")),
            image=str(data["image"]),
            model_dir=str(folder),
        )
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: not found (is {folder} a package folder?)") from exc
    except KeyError as exc:
        raise ConfigError(
            f"{path}: no {exc.args[0]!r} (a package's package.json names model, version and "
            "image: written by `package`)"
        ) from exc
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: unreadable package manifest ({exc!r})") from exc
