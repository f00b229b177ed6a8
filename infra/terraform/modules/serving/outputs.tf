output "namespace" {
  description = "Namespace of the classifier servers; pass it to `datadream registry deploy --namespace`."
  value       = kubernetes_namespace_v1.serving.metadata[0].name
}
