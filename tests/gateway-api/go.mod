// Pins the Gateway API release whose CRDs the tests install (config/crd/standard/); go.sum
// verifies what the Go module proxy serves. Read by fetch.sh; nothing here is compiled.
module kubegrpc.io/gateway-api-crds

go 1.26.0

require sigs.k8s.io/gateway-api v1.6.3 // indirect
