"""Attempts in containers (``--image``): podman or docker, a warm container per slot.

``spec`` (:class:`ContainerSpec`) is what a run's containers look like, built once; ``executor``
starts attempts in them, ``warm`` keeps one container per slot warm, ``runtime`` finds the
container engine and checks images. The package imports nothing.
"""
