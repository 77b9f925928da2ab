// A compiled echo upstream for benchmarks, so the application behind the proxies is never the
// bottleneck (a Python one is, past a few thousand connections per second). Half-closes after
// the client did. Prints "ready host:port". Build: go build -o /tmp/upstream upstream.go
package main

import (
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	address := flag.String("address", "127.0.0.1:0", "ip:port to listen on (port 0: any)")
	flag.Parse()
	ln, err := net.Listen("tcp", *address)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Printf("ready %s\n", ln.Addr())
	go func() {
		stop := make(chan os.Signal, 1)
		signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
		<-stop
		os.Exit(0)
	}()
	for {
		conn, err := ln.Accept()
		if err != nil {
			continue
		}
		go func(c *net.TCPConn) {
			defer c.Close()
			io.Copy(c, c)
			c.CloseWrite()
		}(conn.(*net.TCPConn))
	}
}
