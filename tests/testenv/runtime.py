"""A plain synchronous client of a node's containerd, for tests, the demo and benchmarks
to look at (and prepare) a node directly, independently of the agent under test."""

from __future__ import annotations

import grpc
from google.protobuf import field_mask_pb2

from protos.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from protos.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from protos.cri.runtime.v1 import api_pb2, api_pb2_grpc

PINNED_LABEL = "io.cri-containerd.pinned"
NAMESPACE_HEADER = "containerd-namespace"


class NodeRuntime:
    """CRI plus containerd's own images and content services over one unix socket."""

    def __init__(self, endpoint: str, namespace: str = "k8s.io") -> None:
        self.channel = grpc.insecure_channel(endpoint)
        self.images = api_pb2_grpc.ImageServiceStub(self.channel)
        self.runtime = api_pb2_grpc.RuntimeServiceStub(self.channel)
        self.ctr_images = images_pb2_grpc.ImagesStub(self.channel)
        self.ctr_content = content_pb2_grpc.ContentStub(self.channel)
        self.metadata: tuple[tuple[str, str | bytes], ...] = ((NAMESPACE_HEADER, namespace),)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> NodeRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- CRI -------------------------------------------------------------------------

    def pull(self, ref: str, auth: api_pb2.AuthConfig | None = None, timeout: float = 120) -> str:
        request = api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=ref), auth=auth)
        return str(self.images.PullImage(request, timeout=timeout).image_ref)

    def status(self, ref: str) -> api_pb2.Image | None:
        """The image as CRI reports it, or None when absent."""
        resp = self.images.ImageStatus(
            api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=ref)), timeout=10
        )
        return resp.image if resp.HasField("image") else None

    def list(self) -> list[api_pb2.Image]:
        return list(self.images.ListImages(api_pb2.ListImagesRequest(), timeout=10).images)

    def remove(self, ref: str) -> None:
        self.images.RemoveImage(
            api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=ref)), timeout=30
        )

    # -- containerd ------------------------------------------------------------------

    def set_label(self, name: str, key: str, value: str | None) -> images_pb2.Image:
        """Sets (or with None removes) one label on a containerd image record.

        The update carries the whole current record: containerd 2.2 dereferences the
        target of every Update and crashes on one without it.
        """
        image = self.image_record(name)
        if value is None:
            image.labels.pop(key, None)
        else:
            image.labels[key] = value
        request = images_pb2.UpdateImageRequest(
            image=image, update_mask=field_mask_pb2.FieldMask(paths=[f"labels.{key}"])
        )
        return self.ctr_images.Update(request, metadata=self.metadata, timeout=10).image

    def records(self) -> dict[str, dict[str, str]]:
        """containerd's own image records (what `ctr -n k8s.io images ls` shows): every
        name, tags, digest references and ids alike, with its labels."""
        resp = self.ctr_images.List(
            images_pb2.ListImagesRequest(), metadata=self.metadata, timeout=10
        )
        return {image.name: dict(image.labels) for image in resp.images}

    def image_record(self, name: str) -> images_pb2.Image:
        return self.ctr_images.Get(
            images_pb2.GetImageRequest(name=name), metadata=self.metadata, timeout=10
        ).image

    def blobs(self) -> set[str]:
        """Digests the content store holds (blobs outlive RemoveImage until GC runs)."""
        digests: set[str] = set()
        for resp in self.ctr_content.List(
            content_pb2.ListContentRequest(), metadata=self.metadata, timeout=10
        ):
            digests.update(info.digest for info in resp.info)
        return digests
