"""``runtime.v1.ImageService``: kubelet's image calls, translated to :class:`~plugins.cri.images.CriImages`.

What kubelet relies on, as containerd answers it:

* ImageStatus of an image that is not there is an empty response (no
  ``image``), never NotFound: kubelet pulls when it sees one.
* RemoveImage of an image that is not there is OK.
* PullImage answers the image id (the config digest), the same value
  ``Image.id`` and later ``ContainerStatus.image_id`` carry.
* Failed pulls are UNKNOWN with ``failed to pull and unpack image "<ref>": <why>``
  (a wrong password included, as containerd's 401 errors are), except a bad
  request (InvalidArgument) and an image the registry does not have
  (NotFound), which keep their codes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import betterproto

from daemon.errors import BerthError, Canceled, DeadlineExceeded, InvalidArgument, NotFound
from daemon.validate import required
from plugins.cri.images import CriImage, CriImages, FsUsage, PullCredentials, credentials, normalize
from protos.runtime import v1 as cri

#: Images per StreamImagesResponse.
STREAM_CHUNK = 100
#: Pull errors that keep their own code; any other is UNKNOWN, as containerd's.
_KEPT = (InvalidArgument, NotFound, Canceled, DeadlineExceeded)


def image_to_pb(image: CriImage) -> cri.Image:
    uid, username = image.user
    out = cri.Image(
        id=image.id,
        repo_tags=list(image.repo_tags),
        repo_digests=list(image.repo_digests),
        size=image.size,
        username=username,
        spec=cri.ImageSpec(image=image.id),
        pinned=image.pinned,
    )
    if uid is not None:
        out.uid = cri.Int64Value(value=uid)
    return out


def fs_usage_to_pb(usage: FsUsage) -> cri.FilesystemUsage:
    return cri.FilesystemUsage(
        timestamp=usage.timestamp_ns,
        fs_id=cri.FilesystemIdentifier(mountpoint=usage.mountpoint),
        used_bytes=cri.UInt64Value(value=usage.used_bytes),
        inodes_used=cri.UInt64Value(value=usage.inodes_used),
    )


def auth_credentials(auth: cri.AuthConfig, domain: str) -> PullCredentials | None:
    """The request's ``auth`` as per-pull credentials (None when it is unset or empty)."""
    if not betterproto.serialized_on_wire(auth):
        return None
    return credentials(
        domain,
        username=auth.username,
        password=auth.password,
        auth=auth.auth,
        server_address=auth.server_address,
        identity_token=auth.identity_token,
        registry_token=auth.registry_token,
    )


class ImageService(cri.ImageServiceBase):
    def __init__(self, images: CriImages) -> None:
        self.images = images

    async def list_images(self, list_images_request: cri.ListImagesRequest) -> cri.ListImagesResponse:
        return cri.ListImagesResponse(images=await self._list(list_images_request.filter))

    async def stream_images(
        self, stream_images_request: cri.StreamImagesRequest
    ) -> AsyncIterator[cri.StreamImagesResponse]:
        """ListImages in chunks of :data:`STREAM_CHUNK` images (at least one response, maybe empty)."""
        images = await self._list(stream_images_request.filter)
        for start in range(0, max(len(images), 1), STREAM_CHUNK):
            yield cri.StreamImagesResponse(images=images[start : start + STREAM_CHUNK])

    async def image_status(self, image_status_request: cri.ImageStatusRequest) -> cri.ImageStatusResponse:
        req = image_status_request
        ref = required(req.image.image, "image.image")
        image = await self.images.get(ref)
        if image is None:
            return cri.ImageStatusResponse()
        info = image.verbose_info() if req.verbose else {}
        return cri.ImageStatusResponse(image=image_to_pb(image), info=info)

    async def pull_image(self, pull_image_request: cri.PullImageRequest) -> cri.PullImageResponse:
        req = pull_image_request
        ref = required(req.image.image, "image.image")
        try:
            reference = normalize(ref)
        except InvalidArgument as exc:
            raise InvalidArgument(f"image.image: {exc.message}") from None
        auth = auth_credentials(req.auth, reference.domain)
        try:
            image_id = await self.images.pull(ref, auth)
        except BerthError as exc:
            why = exc.message.removeprefix(f"{reference}: ")
            message = f'failed to pull and unpack image "{reference}": {why}'
            if isinstance(exc, _KEPT):
                raise type(exc)(message) from exc
            raise BerthError(message) from exc
        return cri.PullImageResponse(image_ref=image_id)

    async def remove_image(self, remove_image_request: cri.RemoveImageRequest) -> cri.RemoveImageResponse:
        ref = required(remove_image_request.image.image, "image.image")
        await self.images.remove(ref)
        return cri.RemoveImageResponse()

    async def image_fs_info(self, image_fs_info_request: cri.ImageFsInfoRequest) -> cri.ImageFsInfoResponse:
        """Images and container root filesystems share the snapshotter: the same usage for both."""
        usage = fs_usage_to_pb(await self.images.fs_usage())
        return cri.ImageFsInfoResponse(image_filesystems=[usage], container_filesystems=[usage])

    async def _list(self, image_filter: cri.ImageFilter) -> list[cri.Image]:
        """Every image, or only the one the filter's ``image.image`` names (none if unknown)."""
        wanted = image_filter.image.image
        if wanted:
            one = await self.images.get(wanted)
            return [image_to_pb(one)] if one is not None else []
        return [image_to_pb(i) for i in await self.images.list()]
