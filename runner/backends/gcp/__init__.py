"""The Google Cloud backend: Pub/Sub, the bucket and a managed instance group of Spot VMs.

``deployment`` opens it from the deployment outputs; ``staging`` uploads local inputs;
``fleet`` drives the instance group; ``events`` holds a run's own event subscriptions;
``combine``, ``compose`` and ``strip`` combine in the bucket; ``quota``, ``doctor`` and
``wheels`` check the project and stage the task's requirements; ``shapes`` runs on other
machine types. With ``worker.backends.gcp`` the only code that imports the cloud SDKs; the
package imports nothing, so importing one module never loads the others' clients.
"""
