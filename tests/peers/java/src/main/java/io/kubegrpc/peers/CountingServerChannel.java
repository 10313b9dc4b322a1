package io.kubegrpc.peers;

import io.grpc.netty.shaded.io.netty.buffer.ByteBuf;
import io.grpc.netty.shaded.io.netty.channel.Channel;
import io.grpc.netty.shaded.io.netty.channel.ChannelHandlerContext;
import io.grpc.netty.shaded.io.netty.channel.ChannelOutboundHandlerAdapter;
import io.grpc.netty.shaded.io.netty.channel.ChannelPromise;
import io.grpc.netty.shaded.io.netty.channel.socket.nio.NioServerSocketChannel;
import java.util.List;
import java.util.logging.Logger;

/**
 * The server's listening socket: counts the TCP connections it accepts and, until each closes,
 * as open. On each accepted plaintext connection it puts a {@link GoAwayWatcher} next to the
 * socket, before grpc-java's own handlers exist, so that it sees every byte the server writes; on
 * a TLS connection a {@link PeerTls.WatcherPlacer}, which puts the watcher above the TLS records.
 */
final class CountingServerChannel extends NioServerSocketChannel {
  private final Counters counters;
  private final boolean tls;

  CountingServerChannel(Counters counters, boolean tls) {
    this.counters = counters;
    this.tls = tls;
  }

  @Override
  protected int doReadMessages(List<Object> accepted) throws Exception {
    int before = accepted.size();
    int read = super.doReadMessages(accepted);
    for (Object child : accepted.subList(before, accepted.size())) {
      if (child instanceof Channel connection) {
        counters.connectionsAccepted.incrementAndGet();
        counters.connectionsOpen.incrementAndGet();
        connection.closeFuture().addListener(closed -> counters.connectionsOpen.decrementAndGet());
        connection
            .pipeline()
            .addFirst(
                tls ? "kubegrpc-goaway-watcher-placer" : "kubegrpc-goaway-watcher",
                tls ? new PeerTls.WatcherPlacer(counters) : new GoAwayWatcher(counters));
      }
    }
    return read;
  }

  /**
   * Follows the HTTP/2 frames the server writes on one connection (below TLS or without it: the
   * bytes are frames, the server's preface being a SETTINGS frame) and counts GOAWAY ENHANCE_YOUR_CALM
   * "too_many_pings" (keepalive enforcement) once the socket write succeeded.
   */
  static final class GoAwayWatcher extends ChannelOutboundHandlerAdapter {
    private static final Logger logger = Logger.getLogger(GoAwayWatcher.class.getName());
    private final Counters counters;
    private final FrameScanner scanner = new FrameScanner();

    GoAwayWatcher(Counters counters) {
      this.counters = counters;
    }

    @Override
    public void write(ChannelHandlerContext ctx, Object msg, ChannelPromise promise)
        throws Exception {
      if (!(msg instanceof ByteBuf bytes)) {
        ctx.write(msg, promise);
        return;
      }
      int found = 0;
      for (int i = bytes.readerIndex(); i < bytes.writerIndex(); i++) {
        found += scanner.next(bytes.getByte(i));
      }
      if (found == 0) {
        ctx.write(msg, promise);
        return;
      }
      int count = found;
      ChannelPromise counted = promise.unvoid();
      counted.addListener(
          written -> {
            if (written.isSuccess()) {
              counters.tooManyPings.addAndGet(count);
              logger.info(
                  "sent GOAWAY ENHANCE_YOUR_CALM too_many_pings to " + ctx.channel().remoteAddress());
            }
          });
      ctx.write(msg, counted);
    }
  }

  /** An HTTP/2 frame stream, one byte at a time (writes split frames anywhere). */
  static final class FrameScanner {
    private static final int HEADER = 9;
    private static final int GOAWAY = 0x7;
    private static final long ENHANCE_YOUR_CALM = 0xb;
    private static final byte[] TOO_MANY_PINGS = "too_many_pings".getBytes();
    /** Last stream id, error code, debug data. */
    private static final int KEEP = 8 + TOO_MANY_PINGS.length;

    private final byte[] header = new byte[HEADER];
    private int headerLength;
    private int remaining;
    private int length;
    private boolean goAway;
    private final byte[] payload = new byte[KEEP];
    private int payloadLength;

    /** Consumes one byte; returns 1 if it completed a GOAWAY too_many_pings frame. */
    int next(byte b) {
      if (headerLength < HEADER) {
        header[headerLength++] = b;
        if (headerLength < HEADER) {
          return 0;
        }
        remaining = (header[0] & 0xff) << 16 | (header[1] & 0xff) << 8 | (header[2] & 0xff);
        length = remaining;
        goAway = header[3] == GOAWAY;
        payloadLength = 0;
        return remaining == 0 ? endFrame() : 0;
      }
      if (goAway && payloadLength < KEEP) {
        payload[payloadLength++] = b;
      }
      remaining--;
      return remaining == 0 ? endFrame() : 0;
    }

    private int endFrame() {
      headerLength = 0;
      if (!goAway || length != KEEP || payloadLength != KEEP) {
        return 0;
      }
      long code =
          (payload[4] & 0xffL) << 24
              | (payload[5] & 0xffL) << 16
              | (payload[6] & 0xffL) << 8
              | (payload[7] & 0xffL);
      if (code != ENHANCE_YOUR_CALM) {
        return 0;
      }
      for (int i = 0; i < TOO_MANY_PINGS.length; i++) {
        if (payload[8 + i] != TOO_MANY_PINGS[i]) {
          return 0;
        }
      }
      return 1;
    }
  }
}
