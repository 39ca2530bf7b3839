{{/* Full name: the release name, unless it already contains the chart name. */}}
{{- define "zerocopy-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "zerocopy-operator.clusterRoleName" -}}
{{- printf "%s-%s" .Release.Namespace (include "zerocopy-operator.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "zerocopy-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "zerocopy-operator.labels" -}}
{{ include "zerocopy-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "zerocopy-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "zerocopy-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "zerocopy-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
The operator's permissions, grouped by purpose. Shared by the ClusterRole
(cluster-wide install) and the per-namespace Roles (namespaced install).
*/}}
{{- define "zerocopy-operator.rules" -}}
# Framework: kopf reports handler outcomes and problems as Events on the ZeroCopyModel or ZeroCopyCluster.
- apiGroups: [""]
  resources: [events]
  verbs: [create]
# Application: watch ZeroCopyModels and ZeroCopyClusters; patch them for kopf's progress annotations, and their status.
- apiGroups: [zerocopy.dev]
  resources: [zerocopymodels, zerocopyclusters]
  verbs: [get, list, watch, patch]
- apiGroups: [zerocopy.dev]
  resources: [zerocopymodels/status, zerocopyclusters/status]
  verbs: [patch]
# Application: the RayService each ZeroCopyModel with its own spec.cluster owns, and the one each ZeroCopyCluster
# owns for the models naming it in spec.clusterRef (created, restored after hand edits, watched for status).
# `delete`: a model that moves from its own spec.cluster onto a ZeroCopyCluster has its own RayService deleted.
# `update` on zerocopymodels/finalizers and zerocopyclusters/finalizers is never used by the operator itself: clusters
# with the OwnerReferencesPermissionEnforcement admission plugin (OpenShift, hardened clusters) require it (and
# `delete` on rayservices) to set the owner reference (with blockOwnerDeletion) that lets the garbage collector
# delete the RayService with its ZeroCopyModel or ZeroCopyCluster.
- apiGroups: [ray.io]
  resources: [rayservices]
  verbs: [get, list, watch, create, update, delete]
- apiGroups: [zerocopy.dev]
  resources: [zerocopymodels/finalizers, zerocopyclusters/finalizers]
  verbs: [update]
{{- end -}}
