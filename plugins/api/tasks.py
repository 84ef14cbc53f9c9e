"""The Tasks service (containerd.services.tasks.v1): placeholder until the runtime plugin lands."""
