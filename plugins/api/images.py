"""``containerd.services.images.v1.Images``: image records on the wire.

An image is a name in a namespace pointing at a target descriptor (see
:mod:`daemon.metadata.images`); this service reads and writes those
records only. Pulling, unpacking and importing are the images plugin's.

As in containerd: Create, Update and Delete publish ``/images/create``,
``/images/update`` and ``/images/delete`` (``containerd.services.images.v1.ImageCreate``
...) in the request's namespace once the change is committed. Update takes
a field mask (``labels``, ``labels.<key>``, ``target``, ``annotations``,
``annotations.<key>``; none replaces labels and target). Delete schedules a
garbage collection of what only the image kept; with ``sync`` it runs the
collection before answering; with ``target`` it deletes only while the
image still points at that digest (NotFound otherwise).
``source_date_epoch`` (containerd 2.x, reproducible builds) is ignored:
record times are always the server's.
"""

from __future__ import annotations

import betterproto.lib.google.protobuf as pb
import structlog

from daemon.errors import InvalidArgument
from daemon.events import EventBus
from daemon.hookspecs import hookimpl
from daemon.metadata import Image, MetadataDB
from daemon.metadata.validate import quote
from daemon.protocols import Descriptor
from daemon.registry import InitContext, Registry
from daemon.server import request_namespace
from daemon.validate import required
from protos.containerd.services.images.v1 import (
    CreateImageRequest,
    CreateImageResponse,
    DeleteImageRequest,
    GetImageRequest,
    GetImageResponse,
    ImageCreate,
    ImageDelete,
    ImagesBase,
    ImageUpdate,
    ListImagesRequest,
    ListImagesResponse,
    UpdateImageRequest,
    UpdateImageResponse,
)
from protos.containerd.services.images.v1 import Image as PbImage
from protos.containerd.types import Descriptor as PbDescriptor

log = structlog.get_logger("berth.api.images")

_UPDATABLE = ("labels", "target", "annotations")


def image_to_pb(image: Image) -> PbImage:
    t = image.target
    return PbImage(
        name=image.name,
        labels=dict(image.labels),
        target=PbDescriptor(
            media_type=t.media_type, digest=t.digest, size=t.size, annotations=dict(t.annotations)
        ),
        created_at=image.created_at,
        updated_at=image.updated_at,
    )


def image_from_pb(image: PbImage, field: str) -> Image:
    """The record an image message describes; the store validates target and labels."""
    name = required(image.name, f"{field}.name")
    t = image.target
    target = Descriptor(t.media_type, t.digest, t.size, dict(t.annotations))
    return Image(name=name, target=target, labels=dict(image.labels))


class ImagesService(ImagesBase):
    def __init__(self, db: MetadataDB, bus: EventBus) -> None:
        self.db = db
        self.images = db.images
        self.bus = bus

    async def get(self, get_image_request: GetImageRequest) -> GetImageResponse:
        name = required(get_image_request.name, "name")
        return GetImageResponse(image=image_to_pb(await self.images.get(request_namespace(), name)))

    async def list(self, list_images_request: ListImagesRequest) -> ListImagesResponse:
        found = await self.images.list(request_namespace(), list(list_images_request.filters))
        return ListImagesResponse(images=[image_to_pb(i) for i in found])

    async def create(self, create_image_request: CreateImageRequest) -> CreateImageResponse:
        req = create_image_request
        namespace = request_namespace()
        created = await self.images.create(namespace, image_from_pb(req.image, "image"))
        self.bus.publish(
            "/images/create", ImageCreate(name=created.name, labels=dict(created.labels)), namespace
        )
        return CreateImageResponse(image=image_to_pb(created))

    async def update(self, update_image_request: UpdateImageRequest) -> UpdateImageResponse:
        req = update_image_request
        namespace = request_namespace()
        paths = list(req.update_mask.paths)
        name = required(req.image.name, "image.name")
        for path in paths:
            if path not in _UPDATABLE and not path.startswith(("labels.", "annotations.")):
                raise InvalidArgument(
                    f"update_mask.paths: cannot update {quote(path)} field of image {quote(name)}"
                )
        image = image_from_pb(req.image, "image")
        if not paths or "target" in paths:
            # The target is replaced as a whole: say which part of the request is wrong.
            required(image.target.digest, "image.target.digest")
            required(image.target.media_type, "image.target.media_type")
        updated = await self.images.update(namespace, image, paths)
        self.bus.publish(
            "/images/update", ImageUpdate(name=updated.name, labels=dict(updated.labels)), namespace
        )
        return UpdateImageResponse(image=image_to_pb(updated))

    async def delete(self, delete_image_request: DeleteImageRequest) -> pb.Empty:
        req = delete_image_request
        namespace = request_namespace()
        name = required(req.name, "name")
        target = ""
        if req.target is not None:
            target = required(req.target.digest, "target.digest")
        await self.images.delete(namespace, name, target_digest=target)
        self.bus.publish("/images/delete", ImageDelete(name=name), namespace)
        if req.sync:
            summary = await self.db.gc.run_now()
            log.debug("image.delete.gc", name=name, blobs_removed=summary.blobs_removed)
        return pb.Empty()


async def init(ic: InitContext) -> ImagesService:
    return ImagesService(ic.get("berth.metadata.v1"), ic.bus)


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.add(
        type="berth.grpc.v1", id="images", init=init, requires=["berth.metadata.v1", "berth.events.v1"]
    )


__all__ = ["ImagesService", "berth_register", "image_from_pb", "image_to_pb"]
