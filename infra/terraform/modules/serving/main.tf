# The classifier's serving namespace: what stays put across model versions. The Deployment, Service,
# HorizontalPodAutoscaler and PodDisruptionBudget themselves are applied by `datadream registry deploy`
# (datadream/serving/deploy.py; infra/serving/classifier.yaml is one rendering): the model version is pinned
# in the pod template and changes with every promotion, so Terraform owning that Deployment would see drift
# after each promotion and put the old version back on the next apply.

locals {
  labels = { "app.kubernetes.io/part-of" = "datadream" }
}

resource "kubernetes_namespace_v1" "serving" {
  metadata {
    name = var.namespace
    labels = merge(local.labels, {
      "pod-security.kubernetes.io/enforce" = "restricted"
      "pod-security.kubernetes.io/warn"    = "restricted"
    })
  }
}

# The serving pods never talk to the Kubernetes API.
resource "kubernetes_service_account_v1" "server" {
  metadata {
    name      = var.service_account
    namespace = kubernetes_namespace_v1.serving.metadata[0].name
    labels    = local.labels
  }
  automount_service_account_token = false
}

# The pipeline's ConfigMap and Secret names (pipelines/pipeline.py ClusterSettings), with only what a
# server needs: the MLflow URL and the same MLflow credentials as the pipeline's datadream-secrets.
resource "kubernetes_config_map_v1" "datadream" {
  metadata {
    name      = var.config_map
    namespace = kubernetes_namespace_v1.serving.metadata[0].name
    labels    = local.labels
  }
  data = {
    MLFLOW_TRACKING_URI = var.mlflow_tracking_uri
    AWS_DEFAULT_REGION  = var.region
  }
}

resource "kubernetes_secret_v1" "datadream" {
  metadata {
    name      = var.secret
    namespace = kubernetes_namespace_v1.serving.metadata[0].name
    labels    = local.labels
  }
  data = {
    MLFLOW_TRACKING_USERNAME = var.mlflow_username
    MLFLOW_TRACKING_PASSWORD = var.mlflow_password
  }
}

# Who may roll the serving Deployment forward and back: the pipeline's register step (deploy setting on)
# and the groups in var.deployer_groups (people running `datadream registry deploy`).
resource "kubernetes_role_v1" "deployer" {
  metadata {
    name      = "datadream-deployer"
    namespace = kubernetes_namespace_v1.serving.metadata[0].name
    labels    = local.labels
  }
  rule {
    api_groups = ["apps"]
    resources  = ["deployments"]
    verbs      = ["get", "list", "watch", "create", "patch", "delete"]
  }
  rule {
    api_groups = [""]
    resources  = ["services"]
    verbs      = ["get", "create", "patch", "delete"]
  }
  rule {
    api_groups = ["autoscaling"]
    resources  = ["horizontalpodautoscalers"]
    verbs      = ["get", "create", "patch", "delete"]
  }
  rule {
    api_groups = ["policy"]
    resources  = ["poddisruptionbudgets"]
    verbs      = ["get", "create", "patch", "delete"]
  }
  # To report why a rollout failed: the new pods and their events.
  rule {
    api_groups = [""]
    resources  = ["pods", "events"]
    verbs      = ["get", "list"]
  }
}

resource "kubernetes_role_binding_v1" "deployer" {
  metadata {
    name      = "datadream-deployer"
    namespace = kubernetes_namespace_v1.serving.metadata[0].name
    labels    = local.labels
  }
  role_ref {
    api_group = "rbac.authorization.k8s.io"
    kind      = "Role"
    name      = kubernetes_role_v1.deployer.metadata[0].name
  }
  subject {
    kind      = "ServiceAccount"
    name      = var.pipeline_service_account
    namespace = var.pipeline_namespace
  }
  dynamic "subject" {
    for_each = var.deployer_groups
    content {
      kind      = "Group"
      name      = subject.value
      api_group = "rbac.authorization.k8s.io"
    }
  }
}

# Clients reach the servers only from the namespaces listed (kubectl port-forward bypasses this).
resource "kubernetes_network_policy_v1" "serving" {
  metadata {
    name      = "classifier-ingress"
    namespace = kubernetes_namespace_v1.serving.metadata[0].name
    labels    = local.labels
  }
  spec {
    pod_selector {
      match_labels = { "app.kubernetes.io/component" = "classifier-server" }
    }
    policy_types = ["Ingress"]
    ingress {
      dynamic "from" {
        for_each = var.client_namespaces
        content {
          namespace_selector {
            match_labels = { "kubernetes.io/metadata.name" = from.value }
          }
        }
      }
      ports {
        port     = tostring(var.port)
        protocol = "TCP"
      }
    }
  }
}
