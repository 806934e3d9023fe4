{{/* Names and labels shared by every object. */}}
{{- define "fledged.labels" -}}
app.kubernetes.io/name: kube-fledged
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "fledged.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The runtime preset: socket path, runtime API and image filesystem. */}}
{{- define "fledged.runtime" -}}
{{- $presets := dict
  "containerd" (dict "socket" "/run/containerd/containerd.sock" "kind" "cri" "fs" "/var/lib/containerd")
  "crio" (dict "socket" "/var/run/crio/crio.sock" "kind" "cri" "fs" "/var/lib/containers/storage")
  "docker" (dict "socket" "/var/run/docker.sock" "kind" "docker" "fs" "/var/lib/docker")
  "k3s" (dict "socket" "/run/k3s/containerd/containerd.sock" "kind" "cri" "fs" "/var/lib/rancher/k3s/agent/containerd")
-}}
{{- $preset := get $presets .Values.runtime | required (printf "runtime must be one of containerd, crio, docker, k3s (got %q)" .Values.runtime) -}}
{{- $socket := .Values.agent.runtimeSocket | default $preset.socket -}}
{{- $fs := .Values.agent.imageFilesystem | default $preset.fs -}}
{{- dict "socket" $socket "kind" $preset.kind "fs" $fs | toJson -}}
{{- end -}}

{{/* The apiserver's address for clusters where the `kubernetes` Service does not route
     (no kube-proxy yet, or its replacement not ready): overrides what the kubelet injects. */}}
{{- define "fledged.apiServerEnv" -}}
{{- if .Values.k8sServiceHost -}}
- {name: KUBERNETES_SERVICE_HOST, value: {{ .Values.k8sServiceHost | quote }}}
- {name: KUBERNETES_SERVICE_PORT, value: {{ .Values.k8sServicePort | default "443" | quote }}}
{{- end }}
{{- end -}}
