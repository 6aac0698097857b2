"""The GitOps repository: Tinkerbell ``Hardware`` manifests and Ktizo ``Device`` documents, and git to commit them."""
