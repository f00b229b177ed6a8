# MLflow tracking server: Postgres backend (RDS), proxied S3 artifacts (only this pod's role can reach the
# bucket), basic-auth on (NO_PERMISSIONS by default), --allowed-hosts for the Service DNS names (without it
# every in-cluster client gets 403 "Invalid Host header"), ClusterIP only, NetworkPolicy to KFP namespaces.

locals {
  pg          = "${var.db_username}:${var.db_password}@${var.db_host}:${var.db_port}"
  labels      = { "app.kubernetes.io/name" = "mlflow" }
  admin_user  = "admin"
  optuna_url  = "postgresql+psycopg2://${local.pg}/optuna?sslmode=require"
  backend_url = "postgresql+psycopg2://${local.pg}/mlflow?sslmode=require"
  auth_url    = "postgresql+psycopg2://${local.pg}/mlflow_auth?sslmode=require"
}

resource "kubernetes_namespace_v1" "mlflow" {
  metadata {
    name   = var.namespace
    labels = { "pod-security.kubernetes.io/enforce" = "restricted" }
  }
}

resource "kubernetes_service_account_v1" "mlflow" {
  metadata {
    name      = var.service_account
    namespace = kubernetes_namespace_v1.mlflow.metadata[0].name
  }
  automount_service_account_token = false
}

resource "random_password" "admin" {
  length  = 32
  special = false
}

resource "random_password" "flask_secret" {
  length  = 48
  special = false
}

resource "kubernetes_secret_v1" "server" {
  metadata {
    name      = "mlflow-server"
    namespace = kubernetes_namespace_v1.mlflow.metadata[0].name
  }
  data = {
    MLFLOW_BACKEND_STORE_URI       = local.backend_url
    MLFLOW_FLASK_SERVER_SECRET_KEY = random_password.flask_secret.result
    "basic_auth.ini"               = <<-INI
      [mlflow]
      default_permission = NO_PERMISSIONS
      database_uri = ${local.auth_url}
      admin_username = ${local.admin_user}
      admin_password = ${random_password.admin.result}
      authorization_function = mlflow.server.auth:authenticate_request_basic_auth
    INI
    # Used once by the db-init Job below.
    PGHOST     = var.db_host
    PGPORT     = tostring(var.db_port)
    PGUSER     = var.db_username
    PGPASSWORD = var.db_password
  }
}

# RDS creates one database ("mlflow"); this Job adds mlflow_auth and optuna (idempotent).
resource "kubernetes_job_v1" "db_init" {
  metadata {
    name      = "mlflow-db-init"
    namespace = kubernetes_namespace_v1.mlflow.metadata[0].name
  }
  spec {
    backoff_limit = 4
    template {
      metadata {
        labels = { "app.kubernetes.io/name" = "mlflow-db-init" }
      }
      spec {
        restart_policy                  = "OnFailure"
        automount_service_account_token = false
        security_context {
          run_as_non_root = true
          run_as_user     = 70
          seccomp_profile {
            type = "RuntimeDefault"
          }
        }
        container {
          name              = "psql"
          image             = var.postgres_client_image
          image_pull_policy = "Always"
          command = ["sh", "-ec", <<-SH
            export PGSSLMODE=require PGDATABASE=mlflow
            for db in mlflow_auth optuna; do
              psql -tAc "SELECT 1 FROM pg_database WHERE datname='$db'" | grep -q 1 || psql -c "CREATE DATABASE $db"
            done
          SH
          ]
          env_from {
            secret_ref {
              name = kubernetes_secret_v1.server.metadata[0].name
            }
          }
          resources {
            requests = { cpu = "50m", memory = "64Mi" }
            limits   = { cpu = "200m", memory = "128Mi" }
          }
          security_context {
            allow_privilege_escalation = false
            read_only_root_filesystem  = true
            capabilities {
              drop = ["ALL"]
            }
          }
        }
      }
    }
  }
  wait_for_completion = true
  timeouts {
    create = "10m"
  }
}

resource "kubernetes_deployment_v1" "mlflow" {
  # checkov:skip=CKV_K8S_43: the image is a variable (var.mlflow_image); the README tells production to pass an @sha256 digest
  # checkov:skip=CKV_K8S_35: the backend URI must be an env var for Kubernetes $(VAR) expansion in args, and MLflow reads the Flask key only from env; the auth config (admin password) is mounted as a file
  metadata {
    name      = "mlflow"
    namespace = kubernetes_namespace_v1.mlflow.metadata[0].name
    labels    = local.labels
  }

  spec {
    replicas = var.replicas
    selector {
      match_labels = local.labels
    }

    template {
      metadata {
        labels = local.labels
      }

      spec {
        service_account_name            = kubernetes_service_account_v1.mlflow.metadata[0].name
        automount_service_account_token = false
        node_selector                   = { "datadream.io/node-pool" = "system" }

        security_context {
          run_as_non_root = true
          run_as_user     = 10001
          fs_group        = 10001
          seccomp_profile {
            type = "RuntimeDefault"
          }
        }

        container {
          name              = "mlflow"
          image             = var.image
          image_pull_policy = "Always"
          command           = ["mlflow"]
          args = [
            "server",
            "--host", "0.0.0.0",
            "--port", tostring(var.port),
            "--workers", "4",
            "--app-name", "basic-auth",
            "--backend-store-uri", "$(MLFLOW_BACKEND_STORE_URI)",
            "--serve-artifacts",
            "--artifacts-destination", var.artifacts_destination,
            "--default-artifact-root", "mlflow-artifacts:/",
            "--allowed-hosts", join(",", var.allowed_hosts),
            "--x-frame-options", "DENY",
          ]

          port {
            name           = "http"
            container_port = var.port
          }

          env {
            name = "MLFLOW_BACKEND_STORE_URI"
            value_from {
              secret_key_ref {
                name = kubernetes_secret_v1.server.metadata[0].name
                key  = "MLFLOW_BACKEND_STORE_URI"
              }
            }
          }
          env {
            name = "MLFLOW_FLASK_SERVER_SECRET_KEY"
            value_from {
              secret_key_ref {
                name = kubernetes_secret_v1.server.metadata[0].name
                key  = "MLFLOW_FLASK_SERVER_SECRET_KEY"
              }
            }
          }
          env {
            name  = "MLFLOW_AUTH_CONFIG_PATH"
            value = "/etc/mlflow/basic_auth.ini"
          }
          env {
            name  = "AWS_DEFAULT_REGION"
            value = var.region
          }
          env {
            # Only artifacts that live under our proxied store may be registered (CVE-2025-11201 class).
            name  = "MLFLOW_CREATE_MODEL_VERSION_SOURCE_VALIDATION_REGEX"
            value = "^(mlflow-artifacts:/|models:/|runs:/).*$"
          }
          env {
            name  = "HOME"
            value = "/tmp"
          }

          volume_mount {
            name       = "auth-config"
            mount_path = "/etc/mlflow"
            read_only  = true
          }
          volume_mount {
            name       = "tmp"
            mount_path = "/tmp"
          }

          resources {
            requests = { cpu = "500m", memory = "1Gi" }
            limits   = { cpu = "2", memory = "4Gi" }
          }

          readiness_probe {
            http_get {
              path = "/health"
              port = "http"
            }
            period_seconds = 10
          }
          liveness_probe {
            http_get {
              path = "/health"
              port = "http"
            }
            initial_delay_seconds = 30
            period_seconds        = 20
          }

          security_context {
            allow_privilege_escalation = false
            read_only_root_filesystem  = true
            capabilities {
              drop = ["ALL"]
            }
          }
        }

        volume {
          name = "auth-config"
          secret {
            secret_name = kubernetes_secret_v1.server.metadata[0].name
            items {
              key  = "basic_auth.ini"
              path = "basic_auth.ini"
            }
          }
        }
        volume {
          name = "tmp"
          empty_dir {}
        }
      }
    }
  }

  depends_on = [kubernetes_job_v1.db_init]
}

resource "kubernetes_service_v1" "mlflow" {
  metadata {
    name      = "mlflow"
    namespace = kubernetes_namespace_v1.mlflow.metadata[0].name
    labels    = local.labels
  }
  spec {
    type     = "ClusterIP"
    selector = local.labels
    port {
      name        = "http"
      port        = var.port
      target_port = "http"
    }
  }
}

# Only the pipeline namespaces reach MLflow (plus kubectl port-forward, which bypasses NetworkPolicy).
resource "kubernetes_network_policy_v1" "mlflow" {
  metadata {
    name      = "mlflow-ingress"
    namespace = kubernetes_namespace_v1.mlflow.metadata[0].name
  }
  spec {
    pod_selector {
      match_labels = local.labels
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
