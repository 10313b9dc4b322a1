// Command etcd is the etcd server, built from its published module so that the test control
// plane does not depend on a distribution package (Debian ships 3.4, too old for a recent
// kube-apiserver's consistent watches).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
