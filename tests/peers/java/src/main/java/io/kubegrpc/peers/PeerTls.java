package io.kubegrpc.peers;

import io.grpc.Attributes;
import io.grpc.Grpc;
import io.grpc.ServerCredentials;
import io.grpc.ServerTransportFilter;
import io.grpc.TlsServerCredentials;
import io.grpc.netty.shaded.io.netty.channel.ChannelHandlerContext;
import io.grpc.netty.shaded.io.netty.channel.ChannelInboundHandlerAdapter;
import io.grpc.netty.shaded.io.netty.channel.ChannelOutboundHandlerAdapter;
import io.grpc.netty.shaded.io.netty.channel.ChannelPromise;
import io.grpc.netty.shaded.io.netty.handler.ssl.SslHandler;
import io.grpc.netty.shaded.io.netty.handler.ssl.SslHandshakeCompletionEvent;
import java.io.File;
import java.io.IOException;
import java.net.InetSocketAddress;
import java.net.SocketAddress;
import java.security.cert.Certificate;
import java.security.cert.X509Certificate;
import java.util.logging.Logger;
import javax.net.ssl.SSLPeerUnverifiedException;
import javax.net.ssl.SSLSession;

/**
 * TLS and mutual TLS for the peer server: grpc-java's own TLS credentials, a log line with the
 * serial number of every client certificate accepted ({@code client certificate serial HEX from
 * IP:PORT}, read by tests/src/peers.rs), and the GOAWAY watcher moved above the TLS records.
 */
final class PeerTls {
  private static final Logger logger = Logger.getLogger(PeerTls.class.getName());

  private PeerTls() {}

  /** TLS with this certificate and key; with a client CA, client certificates are required. */
  static ServerCredentials credentials(String certFile, String keyFile, String clientCaFile)
      throws IOException {
    TlsServerCredentials.Builder tls =
        TlsServerCredentials.newBuilder().keyManager(new File(certFile), new File(keyFile));
    if (clientCaFile != null) {
      tls.trustManager(new File(clientCaFile)).clientAuth(TlsServerCredentials.ClientAuth.REQUIRE);
    }
    return tls.build();
  }

  /**
   * Logs the client certificate of each connection that completed TLS and started HTTP/2
   * (grpc-java calls transportReady then).
   */
  static final class ClientCertificateLogger extends ServerTransportFilter {
    @Override
    public Attributes transportReady(Attributes attributes) {
      SSLSession session = attributes.get(Grpc.TRANSPORT_ATTR_SSL_SESSION);
      if (session == null) {
        return attributes;
      }
      Certificate[] chain;
      try {
        chain = session.getPeerCertificates();
      } catch (SSLPeerUnverifiedException e) {
        return attributes; // TLS without a client certificate
      }
      if (chain.length > 0 && chain[0] instanceof X509Certificate leaf) {
        logger.info(
            "client certificate serial "
                + leaf.getSerialNumber().toString(16)
                + " from "
                + format(attributes.get(Grpc.TRANSPORT_ATTR_REMOTE_ADDR)));
      }
      return attributes;
    }
  }

  /**
   * Put first on a TLS connection, before grpc-java adds its {@link SslHandler}: at the first
   * write (the server's handshake, by when the SslHandler exists) it puts the GOAWAY watcher and a
   * handshake-failure logger right after the SslHandler, where the bytes are HTTP/2 frames, and
   * leaves.
   */
  static final class WatcherPlacer extends ChannelOutboundHandlerAdapter {
    private final Counters counters;

    WatcherPlacer(Counters counters) {
      this.counters = counters;
    }

    @Override
    public void write(ChannelHandlerContext ctx, Object msg, ChannelPromise promise)
        throws Exception {
      ctx.write(msg, promise);
      ChannelHandlerContext ssl = ctx.pipeline().context(SslHandler.class);
      if (ssl == null) {
        return;
      }
      ctx.pipeline()
          .addAfter(
              ssl.name(),
              "kubegrpc-goaway-watcher",
              new CountingServerChannel.GoAwayWatcher(counters))
          .addAfter(ssl.name(), "kubegrpc-tls-handshake-logger", new HandshakeFailureLogger());
      ctx.pipeline().remove(this);
    }
  }

  /** Logs a failed TLS handshake with its reason, as the grpc-go peer does. */
  static final class HandshakeFailureLogger extends ChannelInboundHandlerAdapter {
    @Override
    public void userEventTriggered(ChannelHandlerContext ctx, Object event) throws Exception {
      if (event instanceof SslHandshakeCompletionEvent completion && !completion.isSuccess()) {
        logger.info(
            "TLS handshake with "
                + format(ctx.channel().remoteAddress())
                + " failed: "
                + completion.cause());
      }
      ctx.fireUserEventTriggered(event);
    }
  }

  private static String format(SocketAddress address) {
    return address instanceof InetSocketAddress inet
        ? PeerServer.formatAddress(inet)
        : String.valueOf(address);
  }
}
