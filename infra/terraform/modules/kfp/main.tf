# Kubeflow Pipelines standalone, the upstream kustomize overlays pinned to var.kfp_version
# (the same as `kubectl apply -k github.com/kubeflow/pipelines/manifests/kustomize/...?ref=<version>`),
# applied in the kbst/kustomization provider's priority order (namespaces and CRDs first).

data "kustomization_build" "cluster_scoped" {
  path = "github.com/kubeflow/pipelines/manifests/kustomize/cluster-scoped-resources?ref=${var.kfp_version}"
}

resource "kustomization_resource" "cluster_scoped_p0" {
  for_each = data.kustomization_build.cluster_scoped.ids_prio[0]
  manifest = data.kustomization_build.cluster_scoped.manifests[each.value]
}

resource "kustomization_resource" "cluster_scoped_p1" {
  for_each   = data.kustomization_build.cluster_scoped.ids_prio[1]
  manifest   = data.kustomization_build.cluster_scoped.manifests[each.value]
  depends_on = [kustomization_resource.cluster_scoped_p0]
}

resource "kustomization_resource" "cluster_scoped_p2" {
  for_each   = data.kustomization_build.cluster_scoped.ids_prio[2]
  manifest   = data.kustomization_build.cluster_scoped.manifests[each.value]
  depends_on = [kustomization_resource.cluster_scoped_p1]
}

data "kustomization_build" "platform_agnostic" {
  path = "github.com/kubeflow/pipelines/manifests/kustomize/env/platform-agnostic?ref=${var.kfp_version}"
}

resource "kustomization_resource" "kfp_p0" {
  for_each   = data.kustomization_build.platform_agnostic.ids_prio[0]
  manifest   = data.kustomization_build.platform_agnostic.manifests[each.value]
  depends_on = [kustomization_resource.cluster_scoped_p2]
}

resource "kustomization_resource" "kfp_p1" {
  for_each   = data.kustomization_build.platform_agnostic.ids_prio[1]
  manifest   = data.kustomization_build.platform_agnostic.manifests[each.value]
  depends_on = [kustomization_resource.kfp_p0]
}

resource "kustomization_resource" "kfp_p2" {
  for_each   = data.kustomization_build.platform_agnostic.ids_prio[2]
  manifest   = data.kustomization_build.platform_agnostic.manifests[each.value]
  depends_on = [kustomization_resource.kfp_p1]
}

# S3 pipeline root: the launcher of every step reads this ConfigMap in the run's namespace. Credentials
# come from the environment, i.e. the pipeline-runner ServiceAccount's Pod Identity role (modules/iam).
resource "kubernetes_config_map_v1" "kfp_launcher" {
  metadata {
    name      = "kfp-launcher"
    namespace = var.namespace
  }

  data = {
    defaultPipelineRoot = var.pipeline_root
    providers = yamlencode({
      s3 = {
        default = {
          endpoint   = "s3.${var.region}.amazonaws.com"
          region     = var.region
          disableSSL = false
          credentials = {
            fromEnv = true
          }
        }
      }
    })
  }

  depends_on = [kustomization_resource.kfp_p2]
}
