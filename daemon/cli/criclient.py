"""The CRI client of ``berth cri``: the generated ``runtime.v1`` stubs on berthd's socket.

kubelet's protocol, spoken by the CLI exactly as kubelet and crictl speak it
(no containerd namespace header: CRI objects always live in ``k8s.io``), so
that ``berth cri`` works against any CRI runtime's socket. Unary calls are
bounded by ``timeout``; the event stream, pulls and waits are not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import betterproto
from grpclib.client import Channel

from daemon.cli.commands import CliError
from protos.runtime import v1 as cri

M = TypeVar("M", bound=betterproto.Message)


@dataclass
class CriClient:
    """RuntimeService and ImageService stubs, bounded and unbounded."""

    rt: cri.RuntimeServiceStub
    images: cri.ImageServiceStub
    rt_stream: cri.RuntimeServiceStub
    images_slow: cri.ImageServiceStub

    @classmethod
    def on(cls, channel: Channel, timeout: float | None) -> CriClient:
        return cls(
            rt=cri.RuntimeServiceStub(channel, timeout=timeout),
            images=cri.ImageServiceStub(channel, timeout=timeout),
            rt_stream=cri.RuntimeServiceStub(channel),
            images_slow=cri.ImageServiceStub(channel),
        )

    async def status(self, container_id: str, verbose: bool = False) -> cri.ContainerStatusResponse:
        return await self.rt.container_status(
            cri.ContainerStatusRequest(container_id=container_id, verbose=verbose)
        )

    async def pod_status(self, pod_id: str, verbose: bool = False) -> cri.PodSandboxStatusResponse:
        return await self.rt.pod_sandbox_status(
            cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=verbose)
        )

    async def pods(self, flt: cri.PodSandboxFilter | None = None) -> list[cri.PodSandbox]:
        req = cri.ListPodSandboxRequest(filter=flt if flt is not None else cri.PodSandboxFilter())
        return list((await self.rt.list_pod_sandbox(req)).items)

    async def containers(self, flt: cri.ContainerFilter | None = None) -> list[cri.Container]:
        req = cri.ListContainersRequest(filter=flt if flt is not None else cri.ContainerFilter())
        return list((await self.rt.list_containers(req)).containers)

    async def run_pod(self, config: cri.PodSandboxConfig, runtime_handler: str = "") -> str:
        req = cri.RunPodSandboxRequest(config=config, runtime_handler=runtime_handler)
        return str((await self.rt.run_pod_sandbox(req)).pod_sandbox_id)

    async def stop_pod(self, pod_id: str) -> None:
        await self.rt.stop_pod_sandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id))

    async def remove_pod(self, pod_id: str) -> None:
        await self.rt.remove_pod_sandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))

    async def create(self, pod_id: str, config: cri.ContainerConfig, pod_config: cri.PodSandboxConfig) -> str:
        req = cri.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=pod_config)
        return str((await self.rt.create_container(req)).container_id)

    async def start(self, container_id: str) -> None:
        await self.rt.start_container(cri.StartContainerRequest(container_id=container_id))

    async def stop(self, container_id: str, grace: int = 0) -> None:
        # The grace period runs inside the call: bound the call by it plus a margin.
        await self.rt_stream.stop_container(
            cri.StopContainerRequest(container_id=container_id, timeout=grace), timeout=grace + 30
        )

    async def remove(self, container_id: str) -> None:
        await self.rt_stream.remove_container(
            cri.RemoveContainerRequest(container_id=container_id), timeout=60
        )

    async def image_status(self, ref: str, verbose: bool = False) -> cri.ImageStatusResponse:
        return await self.images.image_status(
            cri.ImageStatusRequest(image=cri.ImageSpec(image=ref), verbose=verbose)
        )

    async def has_image(self, ref: str) -> bool:
        return bool(betterproto.serialized_on_wire((await self.image_status(ref)).image))

    async def pull(
        self,
        ref: str,
        auth: cri.AuthConfig | None = None,
        pod_config: cri.PodSandboxConfig | None = None,
    ) -> str:
        req = cri.PullImageRequest(image=cri.ImageSpec(image=ref))
        if auth is not None:
            req.auth = auth
        if pod_config is not None:
            req.sandbox_config = pod_config
        return str((await self.images_slow.pull_image(req)).image_ref)


def load_message(path: str, cls: type[M], what: str) -> M:
    """A CRI message from a JSON file in crictl's shape (snake_case or camelCase field names)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise CliError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise CliError(f"{what} {path}: is a directory") from None
    except (PermissionError, UnicodeDecodeError) as exc:
        raise CliError(f"{what} {path}: cannot read: {exc}") from None
    try:
        data: Any = json.loads(text)
    except ValueError as exc:
        raise CliError(f"{what} {path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CliError(f"{what} {path}: expected a JSON object, found {type(data).__name__}")
    try:
        message: M = cls().from_dict(data)
        return message
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise CliError(f"{what} {path}: does not fit {cls.__name__}: {exc}") from None


__all__ = ["CriClient", "load_message"]
